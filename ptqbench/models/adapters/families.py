"""One small adapter per supported VLM family: module paths, the decoder block layout, family quirks.

Adding a family is one class here: where its decoder, vision tower and projector live, and its decoder
block's layout (which module plays which role)."""

from __future__ import annotations

import torch

from ptqbench.methods.base import BlockLayout
from ptqbench.models.adapters.base import Adapter

# Llama-style decoder block (Llama, Qwen2/2.5/3, the text side of every family below).
LLAMA_DECODER = BlockLayout(
    attn_norm="input_layernorm", attn="self_attn",
    q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
    mlp_norm="post_attention_layernorm", mlp="mlp",
    gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj",
)


class Qwen2VLAdapter(Adapter):
    family = "qwen2-vl"
    model_types = ("qwen2_vl",)
    decoder_layout = LLAMA_DECODER
    vision_blocks_path = "model.visual.blocks"
    vision_tower_path = "model.visual"
    projector_path = "model.visual.merger"

    def extra_model_inputs(self, inputs: dict) -> dict:
        # transformers 5.x raises without mm_token_type_ids (and Qwen2.5-VL silently falls back to
        # 1-D positions), so derive them from input_ids when the caller did not pass them.
        if "mm_token_type_ids" in inputs or "input_ids" not in inputs:
            return {}
        ids = inputs["input_ids"]
        tt = torch.zeros_like(ids, dtype=torch.int32)
        tt[ids == self.image_token_id()] = 1
        video = getattr(self.config, "video_token_id", None)
        if video is not None:
            tt[ids == video] = 2
        return {"mm_token_type_ids": tt}


class Qwen25VLAdapter(Qwen2VLAdapter):
    family = "qwen2.5-vl"
    model_types = ("qwen2_5_vl",)
    decoder_layout = LLAMA_DECODER


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3-vl"
    model_types = ("qwen3_vl",)
    decoder_layout = LLAMA_DECODER
    # Vision blocks listed in `vision_config.deepstack_visual_indexes` also feed their own mergers,
    # whose outputs are added to the hidden states of the image tokens after decoder layers 0, 1, ...
    extra_projector_paths = ("model.visual.deepstack_merger_list",)

    # Qwen3-VL adds "deepstack" visual features to the hidden states after the first few decoder
    # layers; capture them from the language model's call and re-apply them on replay.
    def _extras_hooks(self):
        extras: dict = {}
        lm = self.model.get_submodule("model.language_model")

        def hook(module, args, kwargs):
            extras["visual_pos_masks"] = kwargs.get("visual_pos_masks")
            extras["deepstack_visual_embeds"] = kwargs.get("deepstack_visual_embeds")

        return [lm.register_forward_pre_hook(hook, with_kwargs=True)], extras

    def after_layer(self, index, hidden, extras):
        embeds = extras.get("deepstack_visual_embeds")
        if embeds is not None and index < len(embeds):
            lm = self.model.get_submodule("model.language_model")
            process = getattr(lm, "_deepstack_process", None)
            if process is not None:
                return process(hidden, extras["visual_pos_masks"], embeds[index])
            # Same as Qwen3VLTextModel._deepstack_process (transformers 5.x).
            mask = extras["visual_pos_masks"].to(hidden.device)
            hidden = hidden.clone()
            hidden[mask, :] = hidden[mask, :] + embeds[index].to(hidden.device, hidden.dtype)
        return hidden


# CLIP / SigLIP towers are `*VisionModel`s whose encoder sits directly under `vision_tower` in
# transformers 5.x (no `.vision_model` level).
class LlavaAdapter(Adapter):
    family = "llava"
    model_types = ("llava",)
    decoder_layout = LLAMA_DECODER
    vision_blocks_path = "model.vision_tower.encoder.layers"
    vision_tower_path = "model.vision_tower"
    projector_path = "model.multi_modal_projector"


class LlavaOnevisionAdapter(Adapter):
    family = "llava-onevision"
    model_types = ("llava_onevision",)
    decoder_layout = LLAMA_DECODER
    vision_blocks_path = "model.vision_tower.encoder.layers"
    vision_tower_path = "model.vision_tower"
    projector_path = "model.multi_modal_projector"


# Idefics3 and SmolVLM keep the text decoder under `model.text_model` (not `language_model`).
class Idefics3Adapter(Adapter):
    family = "idefics3"
    model_types = ("idefics3", "smolvlm")
    decoder_layout = LLAMA_DECODER
    decoder_path = "model.text_model.layers"
    final_norm_path = "model.text_model.norm"
    vision_blocks_path = "model.vision_model.encoder.layers"
    vision_tower_path = "model.vision_model"
    projector_path = "model.connector"


# HF-native InternVL (InternVL3 / -hf checkpoints): InternViT blocks are `encoder.layer` (singular).
class InternVLAdapter(Adapter):
    family = "internvl"
    model_types = ("internvl",)
    decoder_layout = LLAMA_DECODER
    vision_blocks_path = "model.vision_tower.encoder.layer"
    vision_tower_path = "model.vision_tower"
    projector_path = "model.multi_modal_projector"


ADAPTERS: tuple[type[Adapter], ...] = (
    Qwen2VLAdapter, Qwen25VLAdapter, Qwen3VLAdapter, LlavaAdapter, LlavaOnevisionAdapter,
    Idefics3Adapter, InternVLAdapter,
)
