"""Model adapters: where a VLM family keeps its decoder, vision tower and projector, and how to replay
one decoder layer on captured inputs.

The engine never touches a model except through an adapter. Capture is generic: a forward pre-hook on
the first decoder layer records the hidden states and every keyword argument the model passes to its
layers (attention mask, position ids, position embeddings incl. Qwen's 3-D M-RoPE cos/sin, cache
position), then aborts the forward. Replaying `layer(hidden, **kwargs)` layer by layer is therefore
exact whenever all layers receive the same kwargs; families that do something between layers
(Qwen3-VL's deepstack) override `after_layer`. Each family declares its decoder block layout (roles ->
module names, `ptqbench.methods.base.BlockLayout`): the methods that need a block's structure read it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ptqbench.methods.base import BlockLayout

# The four true-sequential roles (q,k,v -> o -> gate,up -> down) by leaf name, including the names
# vision blocks use (CLIP/SigLIP/Idefics3 `out_proj`/`fc1`/`fc2`, Qwen-VL `attn.qkv`/`attn.proj`/`mlp.fc1`/
# `mlp.linear_fc1`, InternViT `projection_layer`), so that a block whose names are only partly Llama-like
# (Qwen2.5-VL vision: qkv, proj, gate/up/down) still comes out in execution order.
SEQUENTIAL_ROLES = (
    ("q_proj", "k_proj", "v_proj", "qkv"),
    ("o_proj", "out_proj", "proj", "projection_layer"),
    ("gate_proj", "up_proj", "fc1", "linear_fc1"),
    ("down_proj", "fc2", "linear_fc2"),
)
# Attention types whose layers all receive the same mask, so replaying layer 0's kwargs is exact.
FULL_ATTENTION_TYPES = frozenset({"full_attention"})


class _StopForward(Exception):
    pass


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


class Adapter:
    """Base adapter for a `*ForConditionalGeneration` VLM whose text decoder is Llama-like."""

    family: str = "base"
    model_types: tuple[str, ...] = ()  # config.model_type values this adapter handles
    decoder_path: str = "model.language_model.layers"
    final_norm_path: str = "model.language_model.norm"
    vision_blocks_path: str | None = None
    # The module the family calls once per image batch with the processor's pixel tensors (the whole vision
    # encoder; Qwen's includes its merger): evaluation reuses its outputs across cells that keep it in full
    # precision (`ptqbench.eval.cache`). None: never reused.
    vision_tower_path: str | None = None
    projector_path: str | None = None
    lm_head_path: str = "lm_head"

    extra_projector_paths: tuple[str, ...] = ()  # further vision->text projectors (Qwen3-VL deepstack)
    decoder_layout: BlockLayout | None = None  # roles -> module names inside a decoder block

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.check_attention_types()

    def text_config(self):
        get = getattr(self.config, "get_text_config", None)
        if get is not None:
            return get()
        sub = getattr(self.config, "text_config", None)
        return sub if sub is not None else self.config

    def check_attention_types(self) -> None:
        """Replay feeds every decoder layer the kwargs captured at layer 0, which is only exact when all
        layers use the same (full) attention. Refuse models whose text config declares other layer types
        (sliding-window / chunked layers, as in Gemma-like decoders) instead of replaying them wrongly."""
        from ptqbench.errors import BadInput

        types = getattr(self.text_config(), "layer_types", None) or []
        other = sorted(set(types) - FULL_ATTENTION_TYPES)
        if other:
            raise BadInput(
                f"{self.family}: text config layer_types contain {', '.join(map(repr, other))}; the layer-by-layer "
                f"replay supports only {', '.join(sorted(FULL_ATTENTION_TYPES))} decoder layers (every layer must "
                "take the same attention mask)")

    # ---- structure -------------------------------------------------------------------------
    def decoder_layers(self) -> nn.ModuleList:
        return get_module(self.model, self.decoder_path)

    def vision_blocks(self) -> nn.ModuleList | None:
        return get_module(self.model, self.vision_blocks_path) if self.vision_blocks_path else None

    def vision_tower(self) -> nn.Module | None:
        return get_module(self.model, self.vision_tower_path) if self.vision_tower_path else None

    def final_norm(self) -> nn.Module:
        return get_module(self.model, self.final_norm_path)

    def lm_head(self) -> nn.Module:
        return get_module(self.model, self.lm_head_path)

    def projectors(self) -> list[nn.Module]:
        """Every vision->text projector: `projector_path` plus family extras (Qwen3-VL deepstack mergers)."""
        paths = ([self.projector_path] if self.projector_path else []) + list(self.extra_projector_paths)
        return [get_module(self.model, p) for p in paths]

    def image_token_id(self) -> int:
        for cfg in (self.config, getattr(self.config, "text_config", None)):
            for attr in ("image_token_id", "image_token_index"):
                v = getattr(cfg, attr, None) if cfg is not None else None
                if v is not None:
                    return int(v)
        from ptqbench.errors import BadInput

        raise BadInput(f"model type {self.config.model_type!r} has no image token id in its config; accepted: a VLM config with image_token_id")

    def vision_token_ids(self) -> list[int]:
        """Token ids counted as vision tokens (image pads; video pads where the family has them)."""
        ids = [self.image_token_id()]
        v = getattr(self.config, "video_token_id", None)
        if v is not None:
            ids.append(int(v))
        return ids

    def image_token_counts(self, input_ids: torch.Tensor) -> list[int]:
        """Number of image placeholder tokens in each row of `input_ids`."""
        return (input_ids == self.image_token_id()).sum(-1).tolist()

    def block_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}

    def sequential_groups(self, names: list[str]) -> list[list[str]]:
        """Split a block's linear names into true-sequential groups (each group shares one input):
        q,k,v -> o -> gate,up -> down, by the decoder layout's names or by the leaf names of
        `SEQUENTIAL_ROLES` (vision blocks: qkv -> proj -> fc1 -> fc2)."""
        stages = self.decoder_layout.sequential if self.decoder_layout is not None else ((),) * len(SEQUENTIAL_ROLES)
        groups: list[list[str]] = []
        used: set[str] = set()
        for paths, leaves in zip(stages, SEQUENTIAL_ROLES):
            g = [n for n in names if (n in paths or n.rsplit(".", 1)[-1] in leaves) and n not in used]
            if g:
                groups.append(g)
                used.update(g)
        # Anything unrecognised goes alone, in the order given, after the known roles.
        groups.extend([n] for n in names if n not in used)
        return groups

    # ---- inputs ------------------------------------------------------------------------------
    def extra_model_inputs(self, inputs: dict) -> dict:
        """Extra kwargs a forward needs beyond what the processor returns (e.g. Qwen2-VL's
        mm_token_type_ids when a processor does not provide them)."""
        return {}

    # ---- capture and replay --------------------------------------------------------------------
    def capture(self, inputs: dict) -> tuple[torch.Tensor, dict, dict]:
        """Run the model on `inputs` up to the first decoder layer. Returns (hidden, layer kwargs,
        extras) where extras holds whatever `after_layer` needs."""
        layer0 = self.decoder_layers()[0]
        got: dict[str, Any] = {}

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            got["hidden"], got["kwargs"] = hidden.detach(), kw
            raise _StopForward

        h = layer0.register_forward_pre_hook(hook, with_kwargs=True)
        extras_hooks, extras = self._extras_hooks()
        try:
            with torch.no_grad():
                self.model(**inputs, **self.extra_model_inputs(inputs), use_cache=False)
        except _StopForward:
            pass
        finally:
            h.remove()
            for eh in extras_hooks:
                eh.remove()
        if "hidden" not in got:
            raise RuntimeError(f"{self.family}: the first decoder layer was never called during capture")
        return got["hidden"], clean_layer_kwargs(got["kwargs"]), extras

    def capture_vision(self, inputs: dict) -> tuple[torch.Tensor, list[tuple[tuple, dict]]]:
        """Run the model on `inputs` through the vision tower and stop at the first decoder layer.
        Returns the input of the first vision block and, for every block, the extra positional and
        keyword arguments it was called with (these differ per block, e.g. Qwen2.5-VL's windowed vs
        full-attention `cu_seqlens`), so `replay_vision` is exact."""
        blocks = self.vision_blocks()
        if blocks is None or len(blocks) == 0:
            raise RuntimeError(f"{self.family}: no vision blocks to capture")
        got: dict[str, Any] = {}
        calls: list[tuple[tuple, dict] | None] = [None] * len(blocks)

        def block_hook(i):
            def hook(module, args, kwargs):
                if calls[i] is not None:
                    raise RuntimeError(f"{self.family}: vision block {i} ran more than once in one forward "
                                       "(capture one kind of vision input per batch)")
                kwargs = dict(kwargs)
                hidden = args[0] if args else kwargs.pop("hidden_states")
                if i == 0:
                    got["hidden"] = hidden.detach()
                calls[i] = (tuple(args[1:]), clean_layer_kwargs(kwargs))
            return hook

        def stop(module, args, kwargs):
            raise _StopForward

        handles = [b.register_forward_pre_hook(block_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
        handles.append(self.decoder_layers()[0].register_forward_pre_hook(stop, with_kwargs=True))
        try:
            with torch.no_grad():
                self.model(**inputs, **self.extra_model_inputs(inputs), use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        if "hidden" not in got or any(c is None for c in calls):
            raise RuntimeError(f"{self.family}: the vision tower did not run (no images in the batch?)")
        return got["hidden"], calls  # type: ignore[return-value]

    def replay_vision(self, hidden: torch.Tensor, calls: list[tuple[tuple, dict]], upto: int | None = None,
                      collect: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Replay vision blocks [0, upto) on what `capture_vision` returned."""
        blocks = self.vision_blocks()
        n = len(blocks) if upto is None else upto
        for i in range(n):
            args, kwargs = calls[i]
            out = blocks[i](hidden, *args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
            if collect:
                collect(i, hidden)
        return hidden

    def _extras_hooks(self) -> tuple[list, dict]:
        return [], {}

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        out = layer(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def after_layer(self, index: int, hidden: torch.Tensor, extras: dict) -> torch.Tensor:
        """Hook for families that modify hidden states between decoder layers."""
        return hidden

    def replay(self, hidden: torch.Tensor, kwargs: dict, extras: dict, upto: int | None = None,
               collect: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Replay decoder layers [0, upto) on captured inputs; `collect(i, out)` sees each output."""
        layers = self.decoder_layers()
        for i, layer in enumerate(layers[: upto if upto is not None else len(layers)]):
            hidden = self.after_layer(i, self.run_layer(layer, hidden, kwargs), extras)
            if collect:
                collect(i, hidden)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head()(self.final_norm()(hidden))


def clean_layer_kwargs(kwargs: dict) -> dict:
    """Drop cache objects and flags that make no sense on replay; keep tensors and plain values."""
    drop = {"past_key_values", "past_key_value", "use_cache", "output_attentions", "logits_to_keep"}
    return {k: v for k, v in kwargs.items() if k not in drop}


def move(obj, device=None, dtype=None):
    """Move every tensor inside nested dict/list/tuple structures; floating tensors also get dtype."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device=device) if device is not None else obj
    if isinstance(obj, dict):
        return {k: move(v, device, dtype) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move(v, device, dtype) for v in obj)
    return obj


