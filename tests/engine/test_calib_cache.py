"""The calibration cache is tensors (safetensors) plus a JSON skeleton: it rebuilds the captured set exactly,
runs no code when read, and a file that is not a good entry of this version is recaptured with one warning."""

import enum
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ptqbench.engine import calib_cache as CC
from ptqbench.engine import calibration as C
from ptqbench.models.adapters import adapter_for
from ptqbench.models.tiny import TINY_FAMILIES, build_tiny

from _helpers import tiny_samples, write_sharegpt


def assert_same(a, b, path="set"):
    """Equal values and equal types all the way down: tuples stay tuples, dtypes and shapes exact."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}/{i}")
    elif isinstance(a, C.CalibBatch):
        for f in ("hidden", "kwargs", "extras", "input_ids", "masks", "inputs"):
            assert_same(getattr(a, f), getattr(b, f), f"{path}.{f}")
    else:
        assert a == b, path


def assert_same_set(a: C.CalibSet, b: C.CalibSet):
    assert_same(a.batches, b.batches, "batches")
    assert_same(a.vision_batches, b.vision_batches, "vision_batches")
    assert_same(a.manifest, b.manifest, "manifest")
    assert b.hash == a.hash == C.content_hash(b.batches + b.vision_batches)


class NoCapture:
    """An adapter that fails if the set is captured: the second build must come from the cache."""

    def __getattr__(self, name):
        raise AssertionError(f"recaptured (adapter.{name} was used) instead of loading the cache")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_round_trip_every_family(family, tmp_path):
    torch.manual_seed(0)
    model, processor = build_tiny(family)
    warnings = []
    kw = {"batch_size": 2, "cache_dir": tmp_path, "vision": True, "warn": warnings.append}
    a = C.build_calibration(model, adapter_for(model), processor, "synthvqa", 3, 512, 1, **kw)
    assert [f.name for f in tmp_path.iterdir()] == [f"calib-{a.manifest['cache_key']}.safetensors"]
    b = C.build_calibration(model, NoCapture(), processor, "synthvqa", 3, 512, 1, **kw)
    assert_same_set(a, b)
    assert not warnings
    assert len(b.batches) == 2 and b.vision_batches and all(cb.inputs is not None for cb in b.batches)
    for cb in b.batches:
        assert all(m.dtype == torch.bool for m in cb.masks.values())
        assert type(cb.kwargs["position_embeddings"]) is tuple  # (cos, sin), as the layers take them
    if family == "qwen3-vl":  # deepstack: a bool mask and a list of per-layer features
        ex = b.batches[0].extras
        assert ex["visual_pos_masks"].dtype == torch.bool and type(ex["deepstack_visual_embeds"]) is list


def test_the_same_tensor_is_stored_once_and_shared_on_reload(tiny_qwen, tmp_path):
    """Every vision block gets the same position embeddings: one copy on disk, one object on reload."""
    model, processor = tiny_qwen
    cs = C.build_calibration(model, adapter_for(model), processor, "synthvqa", 2, 512, 1, vision=True)
    f = tmp_path / "c.safetensors"
    CC.write_calibration_cache(cs, f)
    calls = CC.read_calibration_cache(f).vision_batches[0].kwargs["vision_calls"]
    assert len(calls) > 1 and calls[0][1]["position_embeddings"][0] is calls[1][1]["position_embeddings"][0]
    assert not [k for k in load_file(f) if "vision_calls/1/" in k]


# ---- damaged, foreign and planted entries ----------------------------------------------------------
class _Payload:
    """Unpickling this creates the marker file: proof that a pickle was executed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture
def cached(tiny_qwen, tmp_path):
    """A captured set and its cache entry: (build again -> (set, warnings), the entry's path, the set)."""
    model, processor = tiny_qwen
    source = write_sharegpt(tmp_path, tiny_samples(processor, n=3))
    cache_dir = tmp_path / "cache"

    def build(adapter=None, **kw):
        warnings = []
        cs = C.build_calibration(model, adapter or adapter_for(model), processor, str(source), 3, 512, 1,
                                 batch_size=2, cache_dir=cache_dir, warn=warnings.append, **kw)
        return cs, warnings

    first, warnings = build()
    assert not warnings
    (entry,) = cache_dir.glob("calib-*.safetensors")
    return build, entry, first


def test_a_planted_pickle_is_never_executed_and_is_replaced(cached, tmp_path):
    build, entry, first = cached
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()  # the payload is live: loading it with pickle would run code
    marker = tmp_path / "pwned"
    entry.write_bytes(pickle.dumps({"batches": _Payload(marker)}))
    legacy = entry.with_name(entry.name.replace(".safetensors", ".pt"))  # the old cache name
    legacy.write_bytes(pickle.dumps(_Payload(marker)))
    again, warnings = build()
    assert not marker.exists()
    assert len(warnings) == 1 and "calibration cache" in warnings[0] and entry.name in warnings[0], warnings
    assert_same_set(first, again)
    assert_same_set(first, CC.read_calibration_cache(entry, first.manifest["cache_key"]))  # a good entry again
    assert legacy.read_bytes() == pickle.dumps(_Payload(marker))  # ignored, never opened


def _rewrite(entry: Path, edit):
    """Rewrite an entry after `edit(metadata, skeleton, tensors)`: a well-formed file, wrong content."""
    with safe_open(str(entry), "pt") as h:
        meta = h.metadata()
    tensors = load_file(entry)
    skeleton = json.loads(meta["skeleton"])
    edit(meta, skeleton, tensors)
    save_file(tensors, str(entry), metadata=dict(meta, skeleton=json.dumps(skeleton)))


def _flip_last_byte(entry: Path):
    data = bytearray(entry.read_bytes())
    data[-1] ^= 0x01  # a bit of the last tensor's data: the header still parses
    entry.write_bytes(bytes(data))


def _flip_a_hidden_value(meta, skeleton, tensors):
    tensors["batches/0/hidden"][0, -1, 0] += 1.0


def _other_version(meta, skeleton, tensors):
    meta["version"] = str(C.CACHE_VERSION - 1)


def _unknown_node(meta, skeleton, tensors):
    skeleton["batches"][0]["kwargs"] = {"pickle": "gASVAAAAAAAAAAB9lC4="}


def _extra_tensor(meta, skeleton, tensors):
    tensors["stowaway"] = torch.zeros(3)


def _other_key(meta, skeleton, tensors):
    skeleton["manifest"]["cache_key"] = "0" * 20


def _mask_not_bool(meta, skeleton, tensors):
    tensors["batches/0/masks/valid"] = tensors["batches/0/masks/valid"].to(torch.uint8)


SPOILERS = {
    "garbage": lambda e: e.write_bytes(bytes(range(256)) * 40),
    "empty": lambda e: e.write_bytes(b""),
    "truncated": lambda e: e.write_bytes(e.read_bytes()[: e.stat().st_size // 2]),
    "header-only": lambda e: e.write_bytes(e.read_bytes()[: 8 + int.from_bytes(e.read_bytes()[:8], "little")]),
    "json-text": lambda e: e.write_text('{"batches": []}'),
    "foreign-safetensors": lambda e: save_file({"weight": torch.ones(2, 2)}, str(e)),
    "flipped-data-byte": _flip_last_byte,
    "changed-hidden-value": lambda e: _rewrite(e, _flip_a_hidden_value),
    "other-version": lambda e: _rewrite(e, _other_version),
    "unknown-skeleton-node": lambda e: _rewrite(e, _unknown_node),
    "tensor-not-in-skeleton": lambda e: _rewrite(e, _extra_tensor),
    "other-cache-key": lambda e: _rewrite(e, _other_key),
    "mask-not-bool": lambda e: _rewrite(e, _mask_not_bool),
}


@pytest.mark.parametrize("spoil", list(SPOILERS))
def test_a_bad_entry_is_recaptured_with_one_warning(cached, spoil):
    build, entry, first = cached
    SPOILERS[spoil](entry)
    with pytest.raises(CC.CalibCacheError):
        CC.read_calibration_cache(entry, first.manifest["cache_key"])
    again, warnings = build()
    assert len(warnings) == 1 and "calibration cache" in warnings[0] and "\n" not in warnings[0], warnings
    assert_same_set(first, again)
    assert_same_set(first, CC.read_calibration_cache(entry, first.manifest["cache_key"]))
    assert not build(adapter=NoCapture())[1]  # and the rewritten entry is used from then on


def test_default_warning_is_one_stderr_line(tiny_qwen, tmp_path, capsys):
    model, processor = tiny_qwen
    a = C.build_calibration(model, adapter_for(model), processor, "synthvqa", 2, 512, 1, cache_dir=tmp_path)
    (entry,) = tmp_path.glob("calib-*.safetensors")
    capsys.readouterr()
    entry.write_bytes(b"\x00garbage" * 10)
    b = C.build_calibration(model, adapter_for(model), processor, "synthvqa", 2, 512, 1, cache_dir=tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "calibration cache" in err[0], err
    assert b.hash == a.hash


# ---- what cannot be cached is not cached (and never pickled) ---------------------------------------
class Odd:
    pass


class Mode(enum.IntEnum):  # an int that would come back as a plain int: not cached either
    ON = 1


@pytest.mark.parametrize("odd", [Odd(), torch.float16, {1: torch.ones(1)}, Mode.ON],
                         ids=["object", "dtype", "int-key", "int-enum"])
def test_an_uncachable_kwarg_skips_the_cache(tiny_qwen, tmp_path, odd):
    model, processor = tiny_qwen
    adapter = adapter_for(model)
    capture = adapter.capture

    def capture_with_odd(inputs):
        hidden, kwargs, extras = capture(inputs)
        return hidden, {**kwargs, "odd": odd}, extras

    adapter.capture = capture_with_odd
    warnings = []
    cs = C.build_calibration(model, adapter, processor, "synthvqa", 2, 512, 1, cache_dir=tmp_path,
                             warn=warnings.append)
    assert "odd" in cs.batches[0].kwargs  # the run goes on with the captured set
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left
    assert len(warnings) == 1 and "odd" in warnings[0], warnings
    with pytest.raises(CC.Uncachable, match="batches/0/kwargs/odd"):
        CC.write_calibration_cache(cs, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_cache_is_one_warning_and_the_run_goes_on(tiny_qwen, tmp_path):
    model, processor = tiny_qwen
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    warnings = []
    cs = C.build_calibration(model, adapter_for(model), processor, "synthvqa", 2, 512, 1, cache_dir=blocker,
                             warn=warnings.append)
    assert len(cs) == 2 and len(warnings) == 1 and "not written" in warnings[0], warnings
