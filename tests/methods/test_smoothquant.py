"""SmoothQuant: the smoothing formula of mit-han-lab/smoothquant `smooth_ln_fcs`, an exact fold, padding
masked out of max|X|, and SmoothQuant = RTN when every scale is 1."""

import copy

import pytest
import torch
from torch import nn

from ptqbench.engine.blockwise import quantize_model
from ptqbench.errors import BadInput
from ptqbench.methods import QuantSpec, get_method
from ptqbench.methods import smoothquant as SQ
from ptqbench.methods.base import Method
from ptqbench.methods.quant import quantize_rtn
from ptqbench.models.adapters import adapter_for

from _helpers import outlier_model

pytestmark = pytest.mark.usefixtures("one_thread")
SPEC = QuantSpec(bits=4, group_size=32)


def _reference_smooth_ln_fcs(ln: nn.LayerNorm, fcs: list[nn.Linear], act_scales: torch.Tensor, alpha: float) -> None:
    """mit-han-lab/smoothquant smooth.py `smooth_ln_fcs`, transcribed."""
    weight_scales = torch.cat([fc.weight.abs().max(dim=0, keepdim=True)[0] for fc in fcs], dim=0)
    weight_scales = weight_scales.max(dim=0)[0].clamp(min=1e-5)
    scales = (act_scales.pow(alpha) / weight_scales.pow(1 - alpha)).clamp(min=1e-5)
    ln.weight.div_(scales)
    ln.bias.div_(scales)
    for fc in fcs:
        fc.weight.mul_(scales.view(1, -1))


@torch.no_grad()
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.85, 1.0])
def test_scales_and_fold_match_the_reference(alpha):
    torch.manual_seed(0)
    m = nn.Module()
    m.ln, m.a, m.b = nn.LayerNorm(16), nn.Linear(16, 8), nn.Linear(16, 24)
    m.ln.weight.normal_(), m.ln.bias.normal_()
    act = torch.rand(16) * 10
    ref = copy.deepcopy(m)
    _reference_smooth_ln_fcs(ref.ln, [ref.a, ref.b], act, alpha)
    s = SQ.smoothing_scales(act, [m.a.weight, m.b.weight], alpha)
    SQ.fold_scales(m, "ln", ["a", "b"], s)
    for name in ("ln.weight", "ln.bias", "a.weight", "b.weight"):
        torch.testing.assert_close(m.get_parameter(name), ref.get_parameter(name), rtol=1e-6, atol=0)


def test_input_absmax_ignores_padding():
    x = torch.randn(2, 5, 4)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    x[1, 3:] = 1e6  # padded rows may hold anything
    assert SQ.input_absmax([x], [mask]).max() < 1e3
    torch.testing.assert_close(SQ.input_absmax([x], [mask]), x[mask].abs().amax(0))


class _SmoothProbe(Method):
    """Smooths each block, checks the smoothed block's output on the FP stream, then rounds with RTN."""

    name = "smooth-probe"
    worst: list = []

    @torch.no_grad()
    def quantize_block(self, block):
        scales = SQ.smooth_block(block, 0.5)
        assert all((s != 1).any() for s in scales.values())  # a real smoothing, not the identity
        for b in range(block.n_batches):
            x, v = block.stream("fp", b), block.masks(b)["valid"]
            out, ref = block.run(block.block, x, b)[v], block.run(block.fp_block, x, b)[v]
            _SmoothProbe.worst.append(float((out - ref).abs().max() / ref.abs().max()))
        for n in block.linear_names:
            block.commit(n, quantize_rtn(block.weight(n), self.spec))


def test_smoothing_keeps_the_fp_block_output(tiny_qwen, tiny_calib):
    """The fold is a change of basis: norm(x) / s times W diag(s) is norm(x) W, so the smoothed block (before
    rounding) computes its FP output up to float error, on real calibration inputs with outlier channels."""
    model = outlier_model(tiny_qwen[0])
    _SmoothProbe.worst = []
    quantize_model(model, adapter_for(model), tiny_calib, _SmoothProbe(SPEC))
    assert _SmoothProbe.worst and max(_SmoothProbe.worst) < 1e-5


def test_unit_scales_give_exactly_rtn(tiny_qwen, tiny_calib, monkeypatch):
    """No alpha makes every s_j = 1 (s = max|X|^a / max|W|^(1-a)), so the invariance is checked with the
    scales forced to 1: what is left of SmoothQuant (capture, fold, RTN on the spec) must then be RTN, bit
    for bit. It pins that the fold touches nothing else and the rounding is RTN on the same spec."""
    model = tiny_qwen[0]
    monkeypatch.setattr(SQ, "smoothing_scales", lambda act, weights, alpha: torch.ones_like(act))
    results = {}
    for m in ("smoothquant", "rtn"):
        mm = copy.deepcopy(model)
        results[m] = quantize_model(mm, adapter_for(mm), tiny_calib, get_method(m)(SPEC)).quantized
    assert results["smoothquant"].keys() == results["rtn"].keys()
    for n, qw in results["rtn"].items():
        assert torch.equal(results["smoothquant"][n].qweight, qw.qweight)
        assert torch.equal(results["smoothquant"][n].scale, qw.scale)


def test_smoothquant_lowers_w4a8_error_vs_rtn_on_outliers(tiny_qwen, tiny_calib):
    """With activation outlier channels and 4-bit activations, smoothing should help the deployed stream."""
    model = outlier_model(tiny_qwen[0])
    spec = QuantSpec(bits=8, group_size=32, act_bits=4)
    err = {}
    for m in ("smoothquant", "rtn"):
        mm = copy.deepcopy(model)
        d = quantize_model(mm, adapter_for(mm), tiny_calib, get_method(m)(spec)).diagnostics["blocks"]
        err[m] = d[max(d)]["stream"]["all"]
    assert err["smoothquant"] < err["rtn"]


def test_alpha_out_of_range_is_one_line():
    with pytest.raises(BadInput, match="alpha"):
        get_method("smoothquant")(SPEC, alpha=1.5)
