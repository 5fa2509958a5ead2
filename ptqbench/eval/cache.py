"""Evaluation work that does not depend on the cell, done once per grid and reused by every cell.

Every cell of a grid scores the same items with the same prompts, so two things are computed once:

- **encodings**: the processor's batch (token ids, mask, pixel tensors) for each (processor, texts, images);
  equal tensors of different batches (the two SynthVQA tasks' pixels) are stored once.
- **vision-tower outputs**: a cell that leaves the tower in full precision computes exactly what the grid's
  full-precision tower computes, so its output for a batch is reused. While a cell scores, `tower_reuse`
  replaces the tower module's `forward` (the module the model calls with the pixel tensors, the adapter's
  `vision_tower_path`) by a lookup keyed by a digest of every argument; it does so only when the cell's
  tower holds parameters and buffers equal to the reference's and no hook sits on any of its modules
  (a quantized tower, or one with activation quantizers, is scored as it is), and restores it after.

Reuse is exact: an encoding is handed out as a fresh copy, a tower output as a deep copy, so a caller that
changes what it receives changes nothing stored. The tensors held are capped (`max_bytes`); above the cap
a batch is recomputed, as without the cache. The cache lives as long as its grid.
"""

from __future__ import annotations

import copy
import hashlib
import weakref
from collections import Counter
from contextlib import contextmanager

import torch
from torch import nn

from ptqbench.engine.chat import encode_left

DEFAULT_MAX_BYTES = 1 << 30  # tensors held by one grid's cache (encodings and tower outputs together)
_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device)  # arguments keyed by their repr


class Uncacheable(Exception):
    """A tower call whose arguments cannot be keyed safely (it is computed, never stored)."""


def tensor_digest(t: torch.Tensor) -> str:
    """A digest of a tensor's values, dtype and shape (its bytes, read on the CPU)."""
    c = t.detach().cpu().contiguous().reshape(-1)
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(memoryview(c.view(torch.uint8).numpy()).cast("B"))
    return h.hexdigest()


def tensor_bytes(obj) -> int:
    """Bytes of every tensor inside nested containers and model outputs."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


class EvalCache:
    """Encodings and full-precision vision-tower outputs of one grid, reused across its cells and tasks.

    `reference`: the grid's full-precision model (never modified: cells score copies of it);
    `tower_path`: where its vision tower sits (the adapter's `vision_tower_path`); None: encodings only
    (e.g. a grid that quantizes the vision tower)."""

    def __init__(self, reference: nn.Module | None = None, tower_path: str | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.stats: Counter = Counter()
        self.tower_path = tower_path
        self._ref_tower = reference.get_submodule(tower_path) if reference is not None and tower_path else None
        self._encodings: dict[tuple, dict] = {}
        self._tensors: dict[str, torch.Tensor] = {}  # digest -> the one stored copy
        self._towers: dict[str, object] = {}
        self._tags: dict[int, tuple[weakref.ref, str]] = {}  # id of a handed-out tensor -> its digest
        self._processors: list = []  # kept alive: encodings are keyed by the processor's id
        self._texts: dict[tuple, object] = {}  # prompts and answer lengths per batch (strings and ints)

    def text(self, processor, key: tuple, compute):
        """A small text-side value of a batch (its prompts, its answers' token counts), the same for every cell:
        `compute()` once per (processor, key). `key` must name everything else it depends on."""
        key = (id(processor),) + key
        if key not in self._texts:
            self._texts[key] = compute()
            if processor not in self._processors:  # keyed by its id: kept alive
                self._processors.append(processor)
        return self._texts[key]

    def _fits(self, nbytes: int) -> bool:
        return self.nbytes + nbytes <= self.max_bytes

    # ---- encodings -----------------------------------------------------------------------------------
    def encode(self, processor, texts: list[str], images: list, images_key: tuple, device) -> dict:
        """`encode_left(processor, texts, images, device)`, built once per (processor, texts, images_key).
        `images_key` must identify the images' content (e.g. the SynthVQA item ids)."""
        key = (id(processor), tuple(texts), tuple(images_key))
        stored = self._encodings.get(key)
        if stored is None:
            self.stats["encode_misses"] += 1
            stored = self._store_encoding(key, processor, encode_left(processor, texts, images, torch.device("cpu")))
        else:
            self.stats["encode_hits"] += 1
        out = {}
        for name, (value, digest) in stored.items():
            if isinstance(value, torch.Tensor):
                value = value.to(device, copy=True)
                if digest is not None:
                    self._tag(value, digest)
            out[name] = value
        return out

    def _store_encoding(self, key: tuple, processor, enc: dict) -> dict:
        """{name: (value, digest or None)}; stored when its new tensors fit the cap."""
        entry, new = {}, {}
        for name, value in enc.items():
            if isinstance(value, torch.Tensor):
                digest = tensor_digest(value)
                value = self._tensors.get(digest, new.get(digest, value))
                if digest not in self._tensors:
                    new[digest] = value
                entry[name] = (value, digest)
            else:
                entry[name] = (value, None)
        size = sum(tensor_bytes(t) for t in new.values())
        if self._fits(size):
            self._tensors.update(new)
            self._encodings[key] = entry
            self.nbytes += size
            if processor not in self._processors:
                self._processors.append(processor)
        else:
            self.stats["encode_over_cap"] += 1
        return entry

    def _tag(self, t: torch.Tensor, digest: str) -> None:
        """Remember the digest of a tensor handed out, so the tower need not hash it again."""
        i = id(t)
        self._tags[i] = (weakref.ref(t, lambda _ref, i=i: self._tags.pop(i, None)), digest)

    # ---- vision tower --------------------------------------------------------------------------------
    def tower_of(self, model: nn.Module) -> nn.Module | None:
        """The model's vision tower when its outputs may be reused: the reference's own, or one with equal
        parameters and buffers and no hooks. None otherwise."""
        if self._ref_tower is None:
            return None
        try:
            tower = model.get_submodule(self.tower_path)
        except AttributeError:
            return None
        if any(not _passive(h) for m in tower.modules() for hooks in
               (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks) for h in hooks.values()):
            self.stats["tower_refused"] += 1
            return None
        if tower is not self._ref_tower and not _same_state(tower, self._ref_tower):
            self.stats["tower_refused"] += 1
            return None
        return tower

    @contextmanager
    def tower_reuse(self, model: nn.Module):
        """While open, the model's vision tower returns stored outputs for calls it has seen (see `tower_of`)."""
        tower = self.tower_of(model)
        if tower is None:
            yield
            return
        prior = tower.__dict__.get("forward")  # an instance-level forward (e.g. accelerate's) is kept
        original = tower.forward

        def forward(*args, **kwargs):
            return self._tower_call(original, args, kwargs)

        tower.forward = forward
        try:
            yield
        finally:
            if prior is None:
                del tower.forward
            else:
                tower.forward = prior

    def _tower_call(self, original, args: tuple, kwargs: dict):
        if torch.is_grad_enabled() or _collecting_outputs():  # scoring asks for neither; compute it as it is
            return original(*args, **kwargs)
        try:
            key = self._call_key(args, kwargs)
        except Uncacheable:
            self.stats["tower_calls"] += 1
            return original(*args, **kwargs)
        if key in self._towers:
            self.stats["tower_hits"] += 1
            return copy.deepcopy(self._towers[key])
        self.stats["tower_calls"] += 1
        out = original(*args, **kwargs)
        size = tensor_bytes(out)
        if self._fits(size):
            self._towers[key] = copy.deepcopy(out)  # the caller may change `out` (Qwen2-VL splits it in place)
            self.nbytes += size
        else:
            self.stats["tower_over_cap"] += 1
        return out

    def _call_key(self, args: tuple, kwargs: dict) -> str:
        h = hashlib.sha256()
        for part in (*args, *sorted(kwargs.items())):
            h.update(self._arg_key(part).encode())
            h.update(b";")
        return h.hexdigest()

    def _arg_key(self, value) -> str:
        if isinstance(value, torch.Tensor):
            tag = self._tags.get(id(value))
            if tag is not None and tag[0]() is value:
                self.stats["tower_tagged"] += 1
                digest = tag[1]
            else:
                digest = tensor_digest(value)
            return f"T({digest},{value.device})"
        if isinstance(value, (list, tuple)):
            return f"{type(value).__name__}(" + ",".join(self._arg_key(v) for v in value) + ")"
        if isinstance(value, dict):
            return "dict(" + ",".join(f"{k!r}:{self._arg_key(v)}" for k, v in sorted(value.items())) + ")"
        if isinstance(value, _PLAIN):
            return repr(value)
        raise Uncacheable(type(value).__name__)


def _passive(hook) -> bool:
    """transformers' output-capturing hooks (installed on a model's layers at its first forward) only fill the
    collector of a forward that asks for hidden states or attentions; `_tower_call` never reuses inside one."""
    return getattr(hook, "__module__", None) == "transformers.utils.output_capturing"


def _collecting_outputs() -> bool:
    """Whether transformers is collecting layer outputs (hidden states, attentions) in the forward under way."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    return bool(_active_collector.get())


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    """Equal parameter and buffer names, dtypes and values (compared on `a`'s device)."""
    sa = dict(a.named_parameters()) | dict(a.named_buffers())
    sb = dict(b.named_parameters()) | dict(b.named_buffers())
    if sa.keys() != sb.keys():
        return False
    return all(x.dtype == sb[k].dtype and x.shape == sb[k].shape and torch.equal(x, sb[k].to(x.device))
               for k, x in sa.items())
