"""The per-tensor static activation quantizer (act_scheme "tensor"): its arithmetic, its spec and label, and
the engine's calibration of its scales (the masked input absmax / qmax, padding excluded)."""

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ptqbench.engine.blockwise import _static_act_scales, quantize_model
from ptqbench.errors import BadInput
from ptqbench.methods import QuantSpec, get_method
from ptqbench.methods.quant import quantize_activation_static, static_act_scale
from ptqbench.models.adapters import adapter_for


def test_static_codes_round_clamp_and_keep_dtype():
    scale = torch.tensor(0.5)
    x = torch.tensor([0.26, -0.74, 3.0, -100.0, 100.0, 0.0], dtype=torch.bfloat16)
    got = quantize_activation_static(x, scale, 4)  # codes in [-8, 7]
    want = torch.tensor([0.5, -0.5, 3.0, -4.0, 3.5, 0.0], dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert static_act_scale(torch.tensor(0.0), 8) == pytest.approx(1e-5 / 127)  # clamped before the division
    assert static_act_scale(torch.tensor(12.7), 8) == pytest.approx(0.1)


def test_spec_scheme_label_and_bad_value():
    assert QuantSpec(bits=4, group_size=64, act_bits=8).label == "w4g64a8"
    assert QuantSpec(bits=4, group_size=64, act_bits=8, act_scheme="tensor").label == "w4g64a8t"
    assert QuantSpec(bits=4, group_size=64, act_scheme="tensor").label == "w4g64"  # weights only: no activations
    assert not QuantSpec(act_scheme="tensor").static_activations
    with pytest.raises(BadInput, match="act-scheme 'channel'.*token, tensor") as e:
        QuantSpec(act_bits=8, act_scheme="channel")
    assert "\n" not in str(e.value)


def test_static_scale_is_the_valid_tokens_absmax_over_qmax():
    """Two batches with padding; a huge value at a padded position is ignored, the largest valid one counts."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 3)
    block = nn.Sequential(lin)
    xs = [torch.randn(2, 5, 6), torch.randn(1, 4, 6)]
    valid = [torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool)]
    valid[1][0, 0] = False
    xs[0][0, 4, 2] = 1e4  # padding
    xs[1][0, 0, 1] = -1e4  # padding
    xs[1][0, 3, 5] = -7.5  # the largest valid magnitude
    ctx = SimpleNamespace(linear_names=["0"], n_batches=2, block=block, device=torch.device("cpu"),
                          masks=lambda b: {"valid": valid[b]}, stream=lambda which, b: xs[b],
                          run=lambda module, x, b: module(x))
    got = _static_act_scales(ctx, 8)["0"]
    assert got.dtype == torch.float32 and got.dim() == 0
    assert float(got) == pytest.approx(7.5 / 127)


def test_engine_calibrates_scales_on_the_quantized_block(tiny_qwen, tiny_calib):
    """Block 0 (its quantized-stream input is the captured one): every linear's stored scale is its input absmax
    over valid tokens through the quantized-weight block, / 127; the stored model holds no hooks."""
    model = copy.deepcopy(tiny_qwen[0])
    adapter = adapter_for(model)
    spec = QuantSpec(bits=4, group_size=32, act_bits=8, act_scheme="tensor")
    res = quantize_model(model, adapter, tiny_calib, get_method("rtn")(spec), max_blocks=1)
    assert res.quantized and all("act_scale" in qw.extras for qw in res.quantized.values())
    assert all(not m._forward_pre_hooks for m in model.modules())
    block = adapter.decoder_layers()[0]
    absmax: dict = {}
    hooks = [lin.register_forward_pre_hook(
        lambda m, a, n=n: absmax.__setitem__(n, max(absmax.get(n, 0.0), float(a[0][valid].abs().max()))))
        for n, lin in adapter.block_linears(block).items()]
    with torch.no_grad():
        for b in tiny_calib.batches:
            valid = b.masks["valid"]
            adapter.run_layer(block, b.hidden, b.kwargs)
    for h in hooks:
        h.remove()
    assert any(not b.masks["valid"].all() for b in tiny_calib.batches)  # padding is there to be excluded
    for n, a in absmax.items():
        got = float(res.quantized[f"{adapter.decoder_path}.0.{n}"].extras["act_scale"])
        assert got == pytest.approx(a / 127, rel=1e-6), n
