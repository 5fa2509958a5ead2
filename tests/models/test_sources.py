"""Model sources cannot run code: a checkpoint directory (or a hub id's cached snapshot) is checked before
loading (SHA256SUMS, pickled weights, safetensors headers, JSON files), and every refusal is one
BadInput line naming the bad file and what is accepted."""

import json
import shutil

import pytest
import torch

from ptqbench.errors import BadInput
from ptqbench.models import checkpoints as CK
from ptqbench.models import sources as M
from ptqbench.models.checkpoints import write_sha256sums
from ptqbench.models.sources import check_model_source, load_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Qwen2-VL checkpoint as save_pretrained writes it, and its state dict."""
    from ptqbench.models.tiny import build_tiny

    model, processor = build_tiny("qwen2-vl")
    d = tmp_path_factory.mktemp("saved") / "ckpt"
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return d, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def ckpt(saved, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(saved[0], d)
    return d


def refused(name, match, **kw):
    """check_model_source and load_model both refuse `name` with one line matching `match`."""
    for fn in (check_model_source, lambda n, **k: load_model(n, **k)):
        with pytest.raises(BadInput, match=match) as e:
            fn(str(name), **kw)
        assert "\n" not in str(e.value) and ("accepted" in str(e.value) or "refused" in str(e.value)), str(e.value)
    return str(e.value)


def same_weights(lm, state):
    got = lm.model.state_dict()
    assert set(got) == set(state)
    for k, v in state.items():
        assert torch.equal(got[k], v), k


class _Planted:
    """A pickle that creates `marker` when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def flip(path, at=-100):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


# ---- SHA256SUMS ------------------------------------------------------------------------------------

def test_intact_checkpoint_with_sums_loads(ckpt, saved):
    write_sha256sums(ckpt)
    check_model_source(str(ckpt))
    lm = load_model(str(ckpt))
    assert lm.name == str(ckpt) and not lm.lazy
    same_weights(lm, saved[1])
    assert lm.processor.tokenizer is not None


def test_flipped_byte_in_weights_is_refused(ckpt):
    write_sha256sums(ckpt)
    load_model(str(ckpt))  # verified once: a later change must not hide behind that
    flip(ckpt / "model.safetensors")
    msg = refused(ckpt, r"checkpoint file '.*model\.safetensors' does not match its SHA256 in SHA256SUMS")
    assert str(ckpt) in msg


@pytest.mark.parametrize("edit, match", [
    (lambda d: (d / "config.json").write_text((d / "config.json").read_text().replace("64", "65", 1)),
     r"checkpoint file '.*config\.json' does not match its SHA256"),
    (lambda d: (d / "evil.py").write_text("import os\n"), r"checkpoint file '.*evil\.py' is not listed in SHA256SUMS"),
    (lambda d: (d / "tokenizer.json").unlink(), r"checkpoint file '.*tokenizer\.json' is missing"),
    (lambda d: (d / "SHA256SUMS").write_text("nonsense\n"), r"SHA256SUMS line 1 'nonsense'"),
    (lambda d: (d / "SHA256SUMS").write_text("0" * 64 + "  ../../etc/passwd\n"), r"not a file inside the directory"),
])
def test_other_sums_mismatches_are_refused(ckpt, edit, match):
    write_sha256sums(ckpt)
    edit(ckpt)
    refused(ckpt, match)


def test_unchanged_checkpoint_is_hashed_once(ckpt, monkeypatch):
    write_sha256sums(ckpt)
    monkeypatch.setattr(CK, "_RACY_NS", 0)  # files written just now count as settled
    calls = []
    real = CK.sha256_file
    monkeypatch.setattr(CK, "sha256_file", lambda p: calls.append(p) or real(p))
    check_model_source(str(ckpt))
    n = len(calls)
    assert n == len([p for p in ckpt.iterdir() if p.name != "SHA256SUMS"])
    check_model_source(str(ckpt))
    assert len(calls) == n  # nothing changed: not hashed again
    flip(ckpt / "model.safetensors")
    with pytest.raises(BadInput, match="does not match its SHA256"):
        check_model_source(str(ckpt))


def test_testbed_helper_keeps_its_messages(ckpt):
    from ptqbench.models import testbed as tb

    tb.write_sha256sums(ckpt)
    tb.verify_sha256sums(ckpt)
    flip(ckpt / "model.safetensors")
    with pytest.raises(BadInput, match=r"testbed file .*\(re-run testbed/train\.py"):
        tb.verify_sha256sums(ckpt)


# ---- pickled weights -------------------------------------------------------------------------------

def to_pickle_only(d, state, planted=None):
    (d / "model.safetensors").unlink()
    torch.save(state if planted is None else {"x": _Planted(planted)}, d / "pytorch_model.bin")


def test_pickle_only_checkpoint_needs_the_flag(ckpt, saved):
    to_pickle_only(ckpt, saved[1])
    msg = refused(ckpt, r"pickled weights are refused.*--allow-pickle")
    assert "pytorch_model.bin" in msg
    check_model_source(str(ckpt), allow_pickle=True)
    same_weights(load_model(str(ckpt), allow_pickle=True), saved[1])


@pytest.mark.parametrize("fname", ["weights.pt", "model.pth"])
def test_other_pickle_suffixes_are_refused(ckpt, fname):
    (ckpt / "model.safetensors").unlink()
    torch.save({}, ckpt / fname)
    refused(ckpt, rf"only pickled weights \({fname}\)")


def test_a_planted_pickle_is_never_unpickled(ckpt, saved, tmp_path):
    marker = tmp_path / "ran"
    to_pickle_only(ckpt, saved[1], planted=marker)
    refused(ckpt, "--allow-pickle")
    assert not marker.exists()


def test_safetensors_win_over_a_pickle_beside_them(ckpt, saved, tmp_path):
    marker = tmp_path / "ran"
    torch.save({"x": _Planted(marker)}, ckpt / "pytorch_model.bin")
    same_weights(load_model(str(ckpt)), saved[1])
    assert not marker.exists()


def test_remote_code_stays_off(ckpt, saved, tmp_path):
    marker = tmp_path / "ran"
    (ckpt / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                  "from transformers import Qwen2VLConfig as EvilConfig\n"
                                  "from transformers import Qwen2VLForConditionalGeneration as EvilModel\n")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForImageTextToText": "evil.EvilModel"}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    same_weights(load_model(str(ckpt)), saved[1])
    assert not marker.exists()


def test_no_weights_at_all(ckpt):
    (ckpt / "model.safetensors").unlink()
    refused(ckpt, r"holds no weights; accepted: model\.safetensors")


# ---- damaged files ---------------------------------------------------------------------------------

def _first8(b):
    return b"\xff" * 8 + b[8:]


def _garble_json(b):
    return b[:8] + b"\x00" * 32 + b[40:]


def _truncate(b):
    return b[: len(b) // 2]


@pytest.mark.parametrize("damage, why", [(_first8, "header length"), (_garble_json, "JSON header does not parse"),
                                         (_truncate, "truncated"), (lambda b: b[:5], "shorter than")])
def test_damaged_safetensors_is_refused(ckpt, damage, why):
    w = ckpt / "model.safetensors"
    w.write_bytes(damage(w.read_bytes()))
    refused(ckpt, rf"checkpoint file '.*model\.safetensors' is not a valid safetensors file \(.*{why}")


@pytest.mark.parametrize("damage", [_first8, _garble_json, _truncate])
def test_loader_errors_become_badinput(ckpt, damage, monkeypatch):
    """Past the pre-flight checks, what transformers raises while loading is translated too."""
    monkeypatch.setattr(CK, "_check_safetensors_header", lambda p: None)
    w = ckpt / "model.safetensors"
    w.write_bytes(damage(w.read_bytes()))
    check_model_source(str(ckpt))
    with pytest.raises(BadInput, match=r"checkpoint weights '.*model\.safetensors' of model .* could not be loaded") as e:
        load_model(str(ckpt))
    assert "\n" not in str(e.value)


def test_invalid_config_json(ckpt):
    (ckpt / "config.json").write_text('{"model_type": "qwen2_vl",')
    refused(ckpt, r"checkpoint file '.*config\.json' is not valid JSON")


def test_config_of_the_wrong_shape(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["text_config"] = 5
    (ckpt / "config.json").write_text(json.dumps(cfg))
    check_model_source(str(ckpt))  # a loader's matter
    with pytest.raises(BadInput, match=r"checkpoint file '.*config\.json' of model .* could not be read \(.*text_config"):
        load_model(str(ckpt))


def test_broken_tokenizer(ckpt):
    (ckpt / "tokenizer.json").write_text("{not json")
    refused(ckpt, r"checkpoint file '.*tokenizer\.json' is not valid JSON")
    (ckpt / "tokenizer.json").write_text("{}")
    with pytest.raises(BadInput, match=r"processor files .* could not be loaded \(missing key"):
        load_model(str(ckpt))


def test_sharded_checkpoint_index(ckpt, saved):
    from safetensors.torch import save_file

    (ckpt / "model.safetensors").unlink()
    keys = sorted(saved[1])
    half = {k: saved[1][k].contiguous() for k in keys[: len(keys) // 2]}
    rest = {k: saved[1][k].contiguous() for k in keys[len(keys) // 2:]}
    save_file(half, str(ckpt / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(rest, str(ckpt / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    wm = {k: "model-00001-of-00002.safetensors" for k in half} | {k: "model-00002-of-00002.safetensors" for k in rest}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    same_weights(load_model(str(ckpt)), saved[1])
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    refused(ckpt, r"checkpoint file '.*model-00002-of-00002\.safetensors' listed in model\.safetensors\.index\.json is missing")


# ---- names -------------------------------------------------------------------------------------------

def test_missing_config_json(ckpt):
    (ckpt / "config.json").unlink()
    refused(ckpt, "has no config.json")


@pytest.mark.parametrize("name, match", [
    ("nobody/no-such-model", "neither a local directory nor a hub id in the local cache"),
    ("/no/such/dir", "neither a local directory nor a hub id"),
    ("", "accepted: testbed, tiny:<family>"),
    ("tiny:nope", "tiny family 'nope' is not known; accepted: .*qwen2-vl"),
    ("random:/no/such/config.json", "random model config '/no/such/config.json' does not exist"),
    ("random:{cfg}@10", "image side '10'"),
    ("random:{cfg}@x", "image side 'x'"),
    ("random:{bad_type}", "model type 'bert' .* has no random builder"),
    ("random:{llava}@224", "image side .* only understood for Qwen"),
    ("random:{empty}", "has no config.json"),
    ("{file}", "is a file, not a checkpoint directory"),
])
def test_bad_names(name, match, saved, tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "llava.json").write_text(json.dumps({"model_type": "llava"}))
    (tmp_path / "empty").mkdir()
    name = name.format(cfg=saved[0], bad_type=tmp_path / "bad.json", llava=tmp_path / "llava.json",
                       empty=tmp_path / "empty", file=saved[0] / "config.json")
    with pytest.raises(BadInput, match=match) as e:
        check_model_source(name)
    assert "\n" not in str(e.value) and "accepted" in str(e.value)


def test_unsupported_model_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "bert"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    refused(ckpt, "model type 'bert' .* is not supported")


def test_builtin_sources_pass_the_check(saved):
    check_model_source("tiny:qwen2-vl")
    check_model_source(f"random:{saved[0]}")
    check_model_source(f"random:{saved[0] / 'config.json'}@224")
    from ptqbench.models.testbed import TESTBED_DIR

    if (TESTBED_DIR / "model.safetensors").is_file():
        check_model_source("testbed")


# ---- hub ids in the local cache ----------------------------------------------------------------------

@pytest.fixture
def hub_cache(saved, tmp_path, monkeypatch):
    """A local cache holding acme/tiny-vlm as huggingface_hub lays it out."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-vlm"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    shutil.copytree(saved[0], snap)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return snap


def test_cached_hub_id_resolves_to_its_snapshot(hub_cache, saved):
    lm = load_model("acme/tiny-vlm")
    assert lm.name == "acme/tiny-vlm"
    same_weights(lm, saved[1])


def test_cached_hub_id_is_verified(hub_cache):
    write_sha256sums(hub_cache)
    check_model_source("acme/tiny-vlm")
    flip(hub_cache / "model.safetensors")
    refused("acme/tiny-vlm", r"checkpoint file '.*snapshots/0123456789abcdef0123456789abcdef01234567/"
                             r"model\.safetensors' does not match its SHA256")


def test_cached_hub_id_with_pickles_only(hub_cache, saved):
    to_pickle_only(hub_cache, saved[1])
    refused("acme/tiny-vlm", r"'acme/tiny-vlm \(.*\)' holds only pickled weights.*--allow-pickle")
