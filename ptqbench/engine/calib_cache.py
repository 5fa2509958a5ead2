"""The calibration cache: one safetensors file per captured set, no pickle anywhere.

Every tensor is stored under a path-like key ("batches/0/kwargs/attention_mask"), and the header's
metadata (str -> str) holds a JSON skeleton that rebuilds the nested dicts, lists and tuples around them
with their scalars. Reading it runs no code, and anything that does not rebuild into a set this version
wrote, with the same content hash, is refused (CalibCacheError): the caller captures the set again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ptqbench.engine.calibset import CACHE_VERSION, MASK_KEYS, CalibBatch, CalibSet, hash_into, one_line, short_repr

CACHE_FORMAT = "ptqbench-calibration"
CACHE_SUFFIX = ".safetensors"
_SCALARS = (bool, int, float, str)  # exact types: an IntEnum or numpy scalar would not come back as itself


class CalibCacheError(Exception):
    """A cache file that is damaged, foreign or outdated; the message is one short line."""


class Uncachable(TypeError):
    """The set holds an object the cache format cannot represent (it is never pickled)."""


class _Flattener:
    """Turns nested dict/list/tuple structures into JSON nodes plus a flat {key: tensor} table.

    Nodes: JSON scalars and null stand for themselves; {"t": key} a tensor; {"l": [...]} a list;
    {"u": [...]} a tuple; {"d": [[name, node], ...]} a dict (pairs keep the order)."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self._views: dict[tuple, str] = {}  # the same tensor seen again -> the key it is stored under
        self._storages: set[int] = set()

    def node(self, obj, path: str):
        if obj is None or type(obj) in _SCALARS:
            return obj
        if type(obj) is torch.Tensor:
            return {"t": self._tensor(obj, path)}
        if type(obj) is dict:
            if not all(type(k) is str for k in obj):
                raise Uncachable(f"{path} has a key that is not a string")
            return {"d": [[k, self.node(v, f"{path}/{k}")] for k, v in obj.items()]}
        if type(obj) in (list, tuple):
            items = [self.node(v, f"{path}/{i}") for i, v in enumerate(obj)]
            return {"l": items} if type(obj) is list else {"u": items}
        raise Uncachable(f"{path} is a {type(obj).__module__}.{type(obj).__qualname__}, which only a pickle could hold")

    def _tensor(self, t: torch.Tensor, path: str) -> str:
        if t.layout is not torch.strided or t.is_meta or t.is_quantized:
            raise Uncachable(f"{path} is a {t.layout} tensor")
        # The same tensor in several places (e.g. every vision block's position embeddings) is stored
        # once and comes back as one object, as it was captured.
        view = (str(t.device), t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and view in self._views:
            return self._views[view]
        data = t.detach().cpu().contiguous()
        # safetensors refuses two entries on one storage (e.g. cos and sin cut from one buffer): copy.
        if not data.numel() or data.untyped_storage().data_ptr() in self._storages:
            data = data.clone()
        self._storages.add(data.untyped_storage().data_ptr())
        key, i = path, 1
        while key in self.tensors:  # a dict key holding "/" could spell an existing path
            key, i = f"{path}#{i}", i + 1
        self.tensors[key] = data
        if t.numel():
            self._views[view] = key
        return key


def _plain_json(obj, path: str = "manifest") -> None:
    """The manifest goes into the skeleton as plain JSON: it must come back unchanged."""
    if obj is None or type(obj) in _SCALARS:
        return
    if type(obj) is dict and all(type(k) is str for k in obj):
        for k, v in obj.items():
            _plain_json(v, f"{path}/{k}")
    elif type(obj) is list:
        for i, v in enumerate(obj):
            _plain_json(v, f"{path}/{i}")
    else:
        raise Uncachable(f"{path} is a {type(obj).__name__}, not plain JSON")


_BATCH_FIELDS = ("hidden", "kwargs", "extras", "input_ids", "masks", "inputs")


def _inputs_hash(batches: list[CalibBatch]) -> str:
    """`CalibSet.compute_hash` leaves the processor batches out; the cache checks them with this."""
    h = hashlib.sha256()
    hash_into(h, [b.inputs for b in batches])
    return h.hexdigest()[:16]


def write_calibration_cache(cs: CalibSet, path: str | Path) -> None:
    """Write `cs` to one safetensors file at `path`, atomically (a temporary file, then a rename: a
    killed process or a concurrent writer never leaves a half-written entry under the final name).
    Raises Uncachable (nothing written) when the set holds anything but tensors, None, bool, int,
    float, str and dicts/lists/tuples of them."""
    from safetensors.torch import save_file

    path = Path(path)
    flat = _Flattener()
    _plain_json(cs.manifest)
    skeleton = {
        "manifest": cs.manifest,
        "batches": [{f: flat.node(getattr(b, f), f"batches/{i}/{f}") for f in _BATCH_FIELDS}
                    for i, b in enumerate(cs.batches)],
        "vision_batches": [{f: flat.node(getattr(b, f), f"vision_batches/{i}/{f}") for f in _BATCH_FIELDS}
                           for i, b in enumerate(cs.vision_batches)],
        "inputs_hash": _inputs_hash(cs.batches + cs.vision_batches),
    }
    metadata = {"format": CACHE_FORMAT, "version": str(CACHE_VERSION),
                "skeleton": json.dumps(skeleton, separators=(",", ":"))}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(flat.tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_calibration_cache(path: str | Path, key: str | None = None) -> CalibSet:
    """Load a set written by `write_calibration_cache`, checked: the format and CACHE_VERSION, every mask,
    the cache key (when given) and the content hash recomputed from the loaded tensors. Anything else
    (a pickle, garbage, a truncated or foreign file) raises CalibCacheError; nothing in it is executed."""
    try:
        return _read_cache(Path(path), key)
    except CalibCacheError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a damaged file makes the parsers raise means "damaged"
        raise CalibCacheError(f"{type(e).__name__}: {one_line(e)}") from None


def _read_cache(path: Path, key: str | None) -> CalibSet:
    from safetensors import safe_open

    try:
        f = safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # noqa: BLE001
        raise CalibCacheError(f"not a safetensors file: {one_line(e)}") from None
    with f:
        meta = f.metadata() or {}
        if meta.get("format") != CACHE_FORMAT:
            raise CalibCacheError("not a ptqbench calibration cache")
        if meta.get("version") != str(CACHE_VERSION):
            raise CalibCacheError(f"cache version {meta.get('version')!r}; this version reads {CACHE_VERSION}")
        skeleton = json.loads(meta["skeleton"])
        stored = set(f.keys())
        loaded: dict[str, torch.Tensor] = {}

        def tensor(k) -> torch.Tensor:
            if type(k) is not str or k not in stored:
                raise CalibCacheError(f"the skeleton names a tensor {short_repr(k)} the file does not hold")
            if k not in loaded:
                loaded[k] = f.get_tensor(k)
            return loaded[k]

        batches = [_batch(b, tensor) for b in skeleton["batches"]]
        vision_batches = [_batch(b, tensor) for b in skeleton["vision_batches"]]
    if set(loaded) != stored:
        raise CalibCacheError(f"{len(stored - set(loaded))} stored tensors are not in the skeleton")
    manifest = skeleton["manifest"]
    if type(manifest) is not dict or not batches:
        raise CalibCacheError("no manifest or no batches")
    if key is not None and manifest.get("cache_key") != key:
        raise CalibCacheError(f"cache key {short_repr(manifest.get('cache_key'))}, expected {key!r}")
    cs = CalibSet(batches, manifest, vision_batches)
    if cs.compute_hash() != manifest.get("content_hash"):
        raise CalibCacheError("content hash mismatch")
    if _inputs_hash(batches + vision_batches) != skeleton.get("inputs_hash"):
        raise CalibCacheError("processor inputs hash mismatch")
    return cs


def _rebuild(node, tensor: Callable[[str], torch.Tensor]):
    if node is None or type(node) in _SCALARS:
        return node
    if type(node) is dict and len(node) == 1:
        ((tag, val),) = node.items()
        if tag == "t":
            return tensor(val)
        if tag in ("l", "u") and type(val) is list:
            items = [_rebuild(v, tensor) for v in val]
            return items if tag == "l" else tuple(items)
        if tag == "d" and type(val) is list and all(type(p) is list and len(p) == 2 and type(p[0]) is str for p in val):
            return {k: _rebuild(v, tensor) for k, v in val}
    raise CalibCacheError(f"unknown skeleton node {short_repr(node, 40)}")


def _batch(node, tensor) -> CalibBatch:
    if type(node) is not dict or set(node) != set(_BATCH_FIELDS):
        raise CalibCacheError("a batch without the expected fields")
    b = CalibBatch(**{f: _rebuild(node[f], tensor) for f in _BATCH_FIELDS})
    if not isinstance(b.hidden, torch.Tensor) or not isinstance(b.input_ids, torch.Tensor):
        raise CalibCacheError("a batch without hidden states or input ids")
    if type(b.kwargs) is not dict or type(b.extras) is not dict or (b.inputs is not None and type(b.inputs) is not dict):
        raise CalibCacheError("a batch whose kwargs, extras or inputs are not dicts")
    if type(b.masks) is not dict or not all(k in b.masks for k in MASK_KEYS):
        missing = [k for k in MASK_KEYS if type(b.masks) is not dict or k not in b.masks]
        raise CalibCacheError(f"a batch lacks the mask(s) {', '.join(missing)}")
    for k in MASK_KEYS:
        m = b.masks[k]
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape != b.hidden.shape[:-1]:
            raise CalibCacheError(f"mask {k!r} is not a bool tensor of the hidden states' (batch, tokens) shape")
    return b
