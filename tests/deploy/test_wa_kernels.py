"""Weight-activation layers (W8A8 / W4A8): the int8dyn kernel against the fake-quant reference, its refusals,
the simulated fallback and its label, and deploy on the tiny model against evaluation's hooked fake-quant."""

import copy

import pytest
import torch

from ptqbench.deploy import kernels as K
from ptqbench.deploy.kernels import QuantLinear, auto_kernel, deploy, kernel_label, kernel_unsupported
from ptqbench.errors import BadInput
from ptqbench.methods.quant import (QuantizedWeight, QuantSpec, install_activation_quantizers, quantize_activation,
                                    quantize_rtn)

CPU = torch.device("cpu")


def _wa(bits=8, act_bits=8, group=-1, sym=True, grid="minmax", out_f=48, in_f=96, seed=0):
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))
    return quantize_rtn(w, QuantSpec(bits=bits, group_size=group, sym=sym, grid=grid, act_bits=act_bits))


def _reference(x, qw, bias=None):
    """What evaluation computes (fake-quant), in fp32: per-token quantized input @ W_hat.T."""
    y = quantize_activation(x.float(), qw.spec.act_bits) @ qw.dequantize().t()
    return y if bias is None else y + bias.float()


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


# Outlier channels (what per-token activation quantization suffers from) and one near-zero token.
def _input(rows, in_f, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_f, generator=g) * torch.linspace(0.05, 20, in_f)
    x[0] *= 1e-7  # a token whose absmax is under the 1e-5 clamp
    return x.to(dtype)


@pytest.mark.parametrize("bits,sym,grid", [(8, True, "minmax"), (4, True, "minmax"), (8, False, "minmax"),
                                           (4, False, "gptq"), (8, True, "gptq"), (3, False, "minmax")])
@pytest.mark.parametrize("act_bits", [8, 4])
def test_int8dyn_equals_fake_quant_up_to_fp32_rounding(bits, sym, grid, act_bits):
    qw = _wa(bits=bits, act_bits=act_bits, sym=sym, grid=grid)
    assert kernel_unsupported(qw, "int8dyn", CPU, torch.float32) is None
    bias = torch.randn(qw.qweight.shape[0])
    layer = QuantLinear(qw, bias, "int8dyn", torch.float32)
    assert layer.qweight.dtype == torch.int8 and layer.label == "int8dyn"
    assert (layer.corr is not None) == (bits == 8 and not sym)  # only 8-bit asymmetric codes need the offset
    for rows in (1, 7):
        x = _input(rows, qw.qweight.shape[1], torch.float32)
        with torch.no_grad():
            got = layer(x[None])[0]
        assert _rel(got, _reference(x, qw, bias)) < 2e-6  # integer accumulation, then two fp32 products
    assert K.verify_layer(layer, qw) < 2e-6


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_int8dyn_in_half_precision_is_within_its_rounding(dtype, tol):
    qw = _wa(bits=4)
    layer = QuantLinear(qw, None, "int8dyn", dtype)
    x = _input(5, qw.qweight.shape[1], dtype)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == dtype
    assert _rel(y, _reference(x, qw)) < tol  # weight scales and the output rounded to the dtype, nothing else


def test_int8dyn_refuses_where_it_cannot_be_exact():
    reasons = {
        "weight-only": (_wa(act_bits=16), CPU),
        "grouped": (_wa(bits=4, group=32), CPU),
        "fractional zeros": (None, CPU),
        "cuda": (_wa(), torch.device("cuda")),
    }
    ch = _wa(bits=4, sym=False)
    reasons["fractional zeros"] = (QuantizedWeight(ch.qweight, ch.scale, ch.zero + 0.25, ch.g_idx, ch.spec), CPU)
    expect = {"weight-only": "weight-only", "grouped": "per-channel", "fractional zeros": "integer zero", "cuda": "cpu only"}
    for case, (qw, dev) in reasons.items():
        why = kernel_unsupported(qw, "int8dyn", dev, torch.float32)
        assert why is not None and expect[case] in why and "\n" not in why, case
    with pytest.raises(BadInput, match="per-channel weight scales") as e:
        QuantLinear(_wa(bits=4, group=32), None, "int8dyn")
    assert "\n" not in str(e.value)


def test_auto_picks_int8dyn_where_exact_and_labels_the_simulated_fallback():
    bf = torch.bfloat16
    assert auto_kernel(_wa(bits=4), CPU, bf) == "int8dyn"
    assert auto_kernel(_wa(bits=8, sym=False), CPU, torch.float32) == "int8dyn"
    grouped = _wa(bits=4, group=32, sym=False)
    assert auto_kernel(grouped, CPU, bf) == "int4pack"  # the weight-only rule, activations simulated
    assert QuantLinear(grouped, None, "int4pack", bf).label == "int4pack+fakeA8"
    layer = QuantLinear(grouped, None, "int4pack", torch.float32)
    x = _input(4, grouped.qweight.shape[1], torch.float32)
    with torch.no_grad():
        y = layer(x)
    assert _rel(y, _reference(x, grouped)) < 1e-5
    assert _rel(y, x @ grouped.dequantize().t()) > 1e-3  # the activation quantizer is applied
    fake = QuantLinear(grouped, None, "fake", torch.float32)
    with torch.no_grad():
        assert _rel(fake(x), _reference(x, grouped)) < 1e-6
    assert fake.label == "fake+fakeA8"


# ---- deploy on the tiny model ----------------------------------------------------------------------
def _decoder_rtn(model, spec):
    from ptqbench.models.adapters import adapter_for

    ad = adapter_for(model)
    return {f"{ad.decoder_path}.{i}.{n}": quantize_rtn(m.weight.data, spec)
            for i, blk in enumerate(ad.decoder_layers()) for n, m in ad.block_linears(blk).items()}


@pytest.fixture(scope="module")
def tiny_batch_inputs(tiny_qwen):
    from ptqbench.models.tiny import tiny_batch, tiny_inputs

    return dict(tiny_inputs(tiny_qwen[1], tiny_batch(n=2)))


def _logits(model, inputs, dtype):
    with torch.no_grad():
        return model(**{k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}).logits.float()


@pytest.mark.parametrize("group,dtype,label,tol", [(-1, torch.float32, "int8dyn[fp32]", 1e-4),
                                                   (-1, torch.bfloat16, "int8dyn[bf16]", 5e-2),
                                                   (32, torch.bfloat16, "int4pack+fakeA8[bf16]", 5e-2)])
def test_deploy_w4a8_matches_evaluations_fake_quant(tiny_qwen, tiny_batch_inputs, group, dtype, label, tol):
    model = copy.deepcopy(tiny_qwen[0])
    quantized = _decoder_rtn(model, QuantSpec(bits=4, group_size=group, act_bits=8))
    ref_model = copy.deepcopy(model)
    for name, qw in quantized.items():
        ref_model.get_submodule(name).weight.data = qw.dequantize()
    ref_model.to(dtype)
    weight_only = _logits(ref_model, tiny_batch_inputs, dtype)
    install_activation_quantizers([ref_model.get_submodule(n) for n in quantized], 8)
    ref = _logits(ref_model, tiny_batch_inputs, dtype)
    used = deploy(model, quantized, "auto", dtype=dtype)
    assert kernel_label(model) == label and set(used.values()) == {label.split("[")[0]}
    got = _logits(model, tiny_batch_inputs, dtype)
    assert _rel(got, ref) < tol
    if dtype == torch.float32:  # (in bf16 the A8 effect on these logits is within bf16 rounding)
        assert _rel(got, ref) < _rel(weight_only, ref) / 30  # A8, not weight-only: the quantizer is applied


def test_verify_replaces_a_wrong_int8dyn_and_keeps_the_activation_quantizer(tiny_qwen, monkeypatch):
    model = copy.deepcopy(tiny_qwen[0])
    quantized = _decoder_rtn(model, QuantSpec(bits=8, group_size=-1, sym=True, act_bits=8))
    real = QuantLinear._int8dyn_mm
    monkeypatch.setattr(QuantLinear, "_int8dyn_mm", lambda self, x2: real(self, x2) * 1.5)
    used = deploy(model, quantized, "auto", dtype=torch.float32)
    assert set(used.values()) == {"dequant+fakeA8"}
    assert "relative error" in model.get_submodule(next(iter(quantized))).note
