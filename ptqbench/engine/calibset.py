"""What a captured calibration set is, shared by its builder (`calibration`) and its cache (`calib_cache`).

A calibration set is the input of the first decoder layer for every sample (plus the kwargs the layers
take), with per-token masks (MASK_KEYS, described in :mod:`ptqbench.engine.calibration`). Its identity
is a content hash over those tensors: `CalibSet.hash` is the hash recorded when the set was captured,
`content_hash` recomputes it from the tensors (the cache checks a loaded set with it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

CACHE_VERSION = 3  # 2: masks gained `reply`; 3: safetensors + JSON skeleton instead of a pickle
MASK_KEYS = ("valid", "vision", "text", "answer", "reply")


@dataclass
class CalibBatch:
    hidden: torch.Tensor  # (B, T, D) input of decoder layer 0
    kwargs: dict  # replay kwargs for the decoder layers
    extras: dict  # adapter-specific state (e.g. Qwen3-VL deepstack features)
    input_ids: torch.Tensor  # (B, T)
    masks: dict[str, torch.Tensor]  # valid / vision / text / answer / reply, bool (B, T)
    inputs: dict | None = None  # the processor batch, kept when the vision tower is calibrated too


@dataclass
class CalibSet:
    batches: list[CalibBatch]
    manifest: dict = field(default_factory=dict)
    vision_batches: list[CalibBatch] = field(default_factory=list)  # inputs of vision-tower block 0

    @property
    def hash(self) -> str:
        """The content hash recorded in the manifest when the set was captured."""
        return self.manifest["content_hash"]

    def compute_hash(self) -> str:
        """The content hash of the tensors the set holds now (equal to `hash` for an intact set)."""
        return content_hash(self.batches + self.vision_batches)

    def __len__(self) -> int:
        return sum(b.hidden.shape[0] for b in self.batches)


def hash_into(h, obj) -> None:
    """Feed `obj` (tensors, dicts, lists, tuples, scalars) into the hashlib object `h`, deterministically."""
    if isinstance(obj, torch.Tensor) and obj.is_meta:  # a lazily built block: identified by its seed (fingerprint)
        h.update(f"meta{obj.dtype}{tuple(obj.shape)}".encode())
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        for k in sorted(obj):
            h.update(str(k).encode())
            hash_into(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            hash_into(h, v)
    else:
        h.update(repr(obj).encode())


def content_hash(batches: list[CalibBatch]) -> str:
    """Hash of the batches' hidden states, ids, masks, kwargs and extras (not the processor inputs)."""
    h = hashlib.sha256()
    for b in batches:
        hash_into(h, [b.hidden, b.input_ids, b.masks, b.kwargs, b.extras])
    return h.hexdigest()[:16]


def short_repr(value, limit: int = 60) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[:limit] + "..."


def one_line(e: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, at most `limit` characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."
