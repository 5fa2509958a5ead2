"""Random-weight models built from a real configuration, with decoder blocks materialized lazily.

Quantization cost does not depend on the weights' values, so the cost of quantizing Qwen2-VL-7B or
Qwen2.5-VL-32B can be measured without their checkpoints: ``random:<config.json or dir>`` builds the
model from its configuration with every decoder block left on the ``meta`` device (no memory). The
engine materializes one block at a time, directly on the compute device, with a seeded init
(``materialize_block``); after quantization the block is stored on the CPU. Embeddings, the vision
tower and the head are real tensors on the CPU from the start (capture needs them).

The processor is the family's tiny one (``ptqbench.models.tiny``): the configuration's special
token ids are replaced by that tokenizer's (the weights are random, so no meaning is lost), and the
image processor's resolution is set with ``image_side`` so that a calibration sample reaches the
token count a measurement asks for.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from ptqbench.errors import BadInput

# transformers model_type -> our tiny family (its tokenizer, chat template and image processor)
FAMILY_OF = {
    "qwen2_vl": "qwen2-vl",
    "qwen2_5_vl": "qwen2.5-vl",
    "qwen3_vl": "qwen3-vl",
    "llava": "llava",
    "llava_onevision": "llava-onevision",
    "idefics3": "idefics3",
    "internvl": "internvl",
}
_TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
               "image_token_index", "video_token_index", "image_seq_length")
_TEXT_TOKEN_KEYS = ("pad_token_id", "eos_token_id", "bos_token_id")


def is_lazy(module: nn.Module) -> bool:
    """True when the module still has parameters on the meta device (not materialized)."""
    return any(p.is_meta for p in module.parameters())


def _init_own(root: nn.Module, mod: nn.Module) -> None:
    """transformers' own initialisation of `mod`'s own tensors (weights and RoPE buffers), forced."""
    for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
        if hasattr(t, "_is_hf_initialized"):
            del t._is_hf_initialized
    root._init_weights(mod)


def _init_module(root: nn.Module, module: nn.Module) -> None:
    for sub in module.modules():
        _init_own(root, sub)


def materialize_block(layer: nn.Module, root: nn.Module, device: torch.device, seed: int) -> nn.Module:
    """A fresh copy of a meta `layer` on `device`, initialised as transformers would, seeded by `seed`."""
    block = copy.deepcopy(layer)
    block.to_empty(device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        _init_module(root, block)
    return block


def block_seed(model: nn.Module, index: int) -> int:
    return int(getattr(model, "_ptq_random_seed", 0)) * 100003 + 1 + index


def materialize_all(model: nn.Module, layers: nn.ModuleList, device: torch.device | str = "cpu") -> None:
    """Materialize every meta block of `layers` in place, exactly as the engine would one at a time."""
    for i, layer in enumerate(layers):
        if is_lazy(layer):
            layers[i] = materialize_block(layer, model, torch.device(device), block_seed(model, i))


def _read_config(path: str):
    from transformers import AutoConfig

    if not (os.path.isfile(path) or os.path.isdir(path)):
        raise BadInput(f"random model config {path!r} does not exist; accepted: a config.json file or a directory holding one")
    try:
        if os.path.isfile(path):
            import json

            with open(path, encoding="utf-8") as f:
                d = json.load(f)
            model_type = d.pop("model_type", None)
            if model_type is None:
                raise BadInput(f"config {path!r} has no model_type; accepted: a transformers config.json")
            return AutoConfig.for_model(model_type, **d)
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise BadInput(f"random model config {path!r} could not be read ({str(e).splitlines()[0][:160]}); "
                       "accepted: a transformers config.json") from None


def build_random(path: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0, image_side: int | None = None):
    """(model, processor): the configuration's architecture, decoder blocks on meta, the rest random on CPU."""
    from transformers import AutoModelForImageTextToText

    from ptqbench.models.tiny import build_tiny

    config = _read_config(path)
    family = FAMILY_OF.get(config.model_type)
    if family is None:
        raise BadInput(f"model type {config.model_type!r} of {path!r} has no random builder; accepted: {', '.join(FAMILY_OF)}")
    tiny_model, processor = build_tiny(family)
    tc, rc = tiny_model.config, config
    for k in _TOKEN_KEYS:  # the tiny tokenizer's ids (they are all below the real vocabulary size)
        if hasattr(tc, k) and hasattr(rc, k):
            setattr(rc, k, getattr(tc, k))
    rt, tt = rc.get_text_config(), tc.get_text_config()
    for k in _TEXT_TOKEN_KEYS:
        if hasattr(tt, k):
            setattr(rt, k, getattr(tt, k))
    del tiny_model
    if image_side is not None:
        ip = processor.image_processor
        if not hasattr(ip, "merge_size"):
            raise BadInput(f"an image side (@{image_side}) is only understood for Qwen-family processors; accepted: "
                           + ", ".join(k for k in FAMILY_OF if k.startswith("qwen")) + " configs, or no @side")
        px = image_side * image_side  # Qwen processors resize to a pixel budget: fix it to side^2
        ip.size = type(ip.size)(shortest_edge=px, longest_edge=px)

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    from ptqbench.models.adapters import adapter_for

    decoder_path = adapter_for(model).decoder_path
    # everything but the decoder blocks becomes real (CPU) tensors, initialised as transformers would
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, mod in model.named_modules():
            if name == decoder_path or name.startswith(decoder_path + "."):
                continue
            own = list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False))
            if any(t.is_meta for t in own):
                for pname, p in list(mod.named_parameters(recurse=False)):
                    if p.is_meta:
                        setattr(mod, pname, nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad))
                for bname, b in list(mod.named_buffers(recurse=False)):
                    if b is not None and b.is_meta:
                        mod._buffers[bname] = torch.empty_like(b, device="cpu")
                _init_own(model, mod)
    if getattr(config, "tie_word_embeddings", False) or getattr(config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()
    model._ptq_random_seed = seed
    model.name_or_path = f"random:{path}"
    return model, processor
