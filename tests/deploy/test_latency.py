"""Inference measurement on the tiny model: positive finite numbers, kernel labels, bad input."""

import copy
import math

import pytest
import torch

from ptqbench.errors import BadInput
from ptqbench.deploy import latency as L
from ptqbench.deploy.kernels import deploy
from ptqbench.methods.quant import QuantSpec, quantize_rtn


def _decoder_rtn(model, spec):
    from ptqbench.models.adapters import adapter_for

    ad = adapter_for(model)
    return {f"{ad.decoder_path}.{i}.{n}": quantize_rtn(m.weight.data, spec)
            for i, blk in enumerate(ad.decoder_layers()) for n, m in ad.block_linears(blk).items()}


def _check(r, kernel, batch_size=1, new_tokens=4, repeats=2):
    for k in ("prefill_ms", "decode_tok_s", "first_token_ms", "decode_step_ms"):
        assert math.isfinite(r[k]) and r[k] > 0, (k, r[k])
    for k in ("prefill_ms_spread", "decode_tok_s_spread"):
        assert math.isfinite(r[k]) and r[k] >= 0
    assert isinstance(r["infer_peak_bytes"], int) and r["infer_peak_bytes"] >= 0
    assert r["kernel"] == kernel
    assert set(L.ROW_FIELDS) <= set(r)
    assert len(r["prefill_ms_all"]) == len(r["decode_tok_s_all"]) == repeats
    assert r["prefill_ms_min"] <= r["prefill_ms"] <= r["prefill_ms_max"]
    assert r["batch_size"] == batch_size and r["new_tokens"] == new_tokens and r["prompt_tokens"] > 16
    assert r["spread"] == "iqr" and r["memory_kind"]


def test_measure_inference_dense_and_deployed(tiny_qwen):
    model, processor = tiny_qwen
    dense = copy.deepcopy(model)
    threads = torch.get_num_threads()
    r = L.measure_inference(dense, processor, new_tokens=4, warmup=1, repeats=2, device="cpu", threads=1)
    _check(r, "dense[fp32]")
    assert r["kernels"] == {} and r["threads"] == 1 and torch.get_num_threads() == threads

    q = copy.deepcopy(model)
    used = deploy(q, _decoder_rtn(q, QuantSpec(bits=4, group_size=32)), "auto", dtype=torch.bfloat16)
    assert set(used.values()) == {"int4pack"}
    r = L.measure_inference(q, processor, image=L.probe_image(112, 112), new_tokens=4, batch_size=2, warmup=1,
                            repeats=2)
    _check(r, "int4pack[bf16]", batch_size=2)
    assert r["kernels"] == {"int4pack": len(used)} and r["dtype"] == "bfloat16"


def test_measure_inference_refuses_bad_input(tiny_qwen):
    model, processor = tiny_qwen
    for kw, what in ((dict(new_tokens=1), "new_tokens"), (dict(batch_size=0), "batch_size"),
                     (dict(repeats=0), "repeats"), (dict(warmup=-1), "warmup"), (dict(batch_size=True), "batch_size"),
                     (dict(threads=0), "threads")):
        with pytest.raises(BadInput, match=what):
            L.measure_inference(model, processor, **kw)


def test_spread_is_iqr():
    assert L._spread([5.0]) == 0.0
    assert L._spread([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2.0)  # q3 4 - q1 2 (inclusive quartiles)


def test_probe_image_is_fixed():
    a, b = L.probe_image(), L.probe_image()
    assert a.size == (224, 224) and a.tobytes() == b.tobytes()
    assert L.probe_image(seed=1).tobytes() != a.tobytes()


def test_deploy_and_measure_gives_a_row(tiny_qwen):
    model, processor = tiny_qwen
    fp = L.deploy_and_measure(copy.deepcopy(model), processor, None, new_tokens=2, warmup=0, repeats=1)
    q = copy.deepcopy(model)
    quantized = _decoder_rtn(q, QuantSpec(bits=3, group_size=32))
    r = L.deploy_and_measure(q, processor, quantized, kernel="auto", dtype=torch.float32, device="cpu",
                             new_tokens=2, warmup=0, repeats=1)
    _check(fp, "dense[fp32]", new_tokens=2, repeats=1)
    _check(r, "dequant[fp32]", new_tokens=2, repeats=1)
    assert set(r["kernels_used"]) == set(quantized) and fp["kernels_used"] == {}
    lin = sum(qw.qweight.numel() for qw in quantized.values())
    assert fp["model_bytes"] - r["model_bytes"] > lin * (4 - 3 / 8 - 5 / 32) * 0.99  # 3-bit codes + scale/zero


def test_interleaved_rounds_walk_only_new_objects(monkeypatch):
    """measure_interleaved collects once and freezes what lives, so each round's gc.collect (the peak-memory
    baseline) walks only objects made since; every exit unfreezes. A failing format leaves the others timed."""
    import gc

    seen = []

    def fake(model, processor, **kw):
        seen.append(gc.get_freeze_count())
        if model == "bad":
            raise RuntimeError("no kernel")
        return dict(prefill_ms_all=[1.0], decode_tok_s_all=[10.0], infer_peak_bytes=0, model_bytes=1, kernel="dense")

    monkeypatch.setattr(L, "measure_inference", fake)
    out = L.measure_interleaved({"a": "ok", "b": "bad"}, None, min_rounds=2, max_rounds=3)
    assert all(n > 0 for n in seen) and gc.get_freeze_count() == 0
    assert isinstance(out["b"], RuntimeError) and out["a"]["repeats"] == 2
    monkeypatch.setattr(L, "_interleaved", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        L.measure_interleaved({"a": "ok"}, None)
    assert gc.get_freeze_count() == 0
