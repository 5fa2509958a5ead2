"""The engine: statistics mask padding out, streams advance, every linear is quantized, blocks go back."""

import copy

import torch

from ptqbench.engine import calibration as C
from ptqbench.models.adapters import adapter_for
from ptqbench.engine.blockwise import BlockContext, quantize_model
from ptqbench.methods import QuantSpec, get_method
from ptqbench.methods.base import Method
from ptqbench.methods.gptq import input_stats

from _helpers import tiny_samples, write_sharegpt


class _Probe(Method):
    """Records the Hessians of block 0 on each stream, then quantizes with RTN."""

    name = "probe"
    seen: dict = {}

    def quantize_block(self, block: BlockContext):
        if block.index == 1:
            _Probe.seen["quant"] = input_stats(block, block.groups[0], stream="quant")
            _Probe.seen["both"] = input_stats(block, block.groups[0], stream="both")
        get_method("rtn").quantize_block(self, block)


def test_padding_does_not_change_statistics(tiny_qwen, tmp_path):
    model, processor = tiny_qwen
    path = write_sharegpt(tmp_path, tiny_samples(processor, n=4))
    Hs = []
    for bs in (4, 1):  # padded batches vs one sample per batch (no padding)
        cs = C.build_calibration(model, adapter_for(model), processor, str(path), 4, 512, 1, batch_size=bs)
        m = copy.deepcopy(model)
        quantize_model(m, adapter_for(m), cs, _Probe(QuantSpec(bits=4, group_size=32)))
        Hs.append(_Probe.seen["quant"]["self_attn.q_proj"])
    assert Hs[0].n_tokens == Hs[1].n_tokens
    torch.testing.assert_close(Hs[0].H, Hs[1].H, rtol=1e-4, atol=1e-5)


def test_streams_and_cross_term(tiny_qwen, tiny_calib):
    model = copy.deepcopy(tiny_qwen[0])
    res = quantize_model(model, adapter_for(model), tiny_calib, _Probe(QuantSpec(bits=2, group_size=32)))
    both = _Probe.seen["both"]["self_attn.q_proj"]
    # block 1 sees a quantized stream that differs from the FP one: the cross term is non-zero
    assert both.dXXT is not None and both.dXXT.abs().sum() > 0
    # q, k and v share one input: one statistic object
    assert _Probe.seen["quant"]["self_attn.q_proj"] is _Probe.seen["quant"]["self_attn.v_proj"]
    n_linears = sum(len(adapter_for(model).block_linears(b)) for b in adapter_for(model).decoder_layers())
    assert len(res.quantized) == n_linears
    errs = [res.diagnostics["blocks"][i]["stream"]["all"] for i in sorted(res.diagnostics["blocks"])]
    assert all(e > 0 for e in errs) and errs[-1] > errs[0]  # error accumulates along the stream
    for name, qw in res.quantized.items():  # the model holds exactly the committed grid weights
        assert torch.equal(model.get_submodule(name).weight.data, qw.dequantize().to(model.dtype))
    d = res.diagnostics["linears"][next(iter(res.quantized))]
    assert set(d) == {"all", "vision", "text", "answer"} and d["vision"] is not None
    # wall seconds per block, one entry per quantized block (cost runs read them)
    secs = res.diagnostics["block_seconds"]
    assert sorted(secs) == sorted(res.diagnostics["blocks"]) and all(v > 0 for v in secs.values())


def test_method_must_quantize_every_linear(tiny_qwen, tiny_calib):
    import pytest

    class Lazy(Method):
        name = "lazy"

        def quantize_block(self, block):
            pass

    with pytest.raises(RuntimeError, match="unquantized"):
        quantize_model(copy.deepcopy(tiny_qwen[0]), adapter_for(tiny_qwen[0]), tiny_calib, Lazy(QuantSpec(group_size=32)))


def test_quantize_vision_tower_too(tiny_qwen, tmp_path):
    model, processor = tiny_qwen
    path = write_sharegpt(tmp_path, tiny_samples(processor, n=2))
    cs = C.build_calibration(model, adapter_for(model), processor, str(path), 2, 512, 1, vision=True)
    assert cs.vision_batches and all(b.masks["vision"].all() for b in cs.vision_batches)
    m = copy.deepcopy(model)
    ad = adapter_for(m)
    res = quantize_model(m, ad, cs, get_method("gptq")(QuantSpec(bits=3, group_size=16)), include_vision=True)
    vision_names = [n for n in res.quantized if n.startswith(ad.vision_blocks_path)]
    n_vision = sum(len(ad.block_linears(b)) for b in ad.vision_blocks())
    assert len(vision_names) == n_vision > 0
    assert res.diagnostics["vision_blocks"] and res.diagnostics["blocks"][0]["stream"]["all"] > 0
    # Without the vision tower, the first decoder block sees identical streams: no stream error before it.
    plain = quantize_model(copy.deepcopy(model), adapter_for(model), cs, get_method("rtn")(QuantSpec(bits=8, group_size=16)))
    assert not any(n.startswith(ad.vision_blocks_path) for n in plain.quantized)


class _ActProbe(Method):
    """Records, for block 1, the q_proj inputs on each stream and the block's hooks, then rounds with RTN."""

    name = "act-probe"
    seen: dict = {}

    def quantize_block(self, block: BlockContext):
        if block.index == 1:
            _ActProbe.seen = {s: block.linear_inputs(["self_attn.q_proj"], 0, s)["self_attn.q_proj"] for s in ("quant", "fp")}
            _ActProbe.seen["fp_hooks"] = sum(len(m._forward_pre_hooks) for m in block.fp_block.modules())
        get_method("rtn").quantize_block(self, block)


def test_activation_quantizer_on_the_quantized_stream_only(tiny_qwen, tiny_calib):
    """W4A8: the quantized block's linears see per-token 8-bit inputs (quantizing them again changes
    nothing), the FP stream and the FP copy never do, and no hook is left on the model afterwards."""
    from ptqbench.methods.quant import quantize_activation

    model = copy.deepcopy(tiny_qwen[0])
    res = quantize_model(model, adapter_for(model), tiny_calib, _ActProbe(QuantSpec(bits=4, group_size=32, act_bits=8)))
    q, fp = _ActProbe.seen["quant"], _ActProbe.seen["fp"]
    torch.testing.assert_close(quantize_activation(q, 8), q, rtol=0, atol=1e-6)
    assert not torch.allclose(quantize_activation(fp, 8), fp)
    assert _ActProbe.seen["fp_hooks"] == 0
    assert all(not m._forward_pre_hooks for m in model.modules())
    # the deployed stream differs from the weight-only one (same weights: RTN does not read inputs)
    wo = copy.deepcopy(tiny_qwen[0])
    res_wo = quantize_model(wo, adapter_for(wo), tiny_calib, get_method("rtn")(QuantSpec(bits=4, group_size=32)))
    last = max(res.diagnostics["blocks"])
    assert res.diagnostics["blocks"][last]["stream"]["all"] != res_wo.diagnostics["blocks"][last]["stream"]["all"]
    for n, qw in res_wo.quantized.items():
        assert torch.equal(res.quantized[n].qweight, qw.qweight)
