"""The shared AWQ/MBQ scale search in weight-activation formats (thu-nics/MBQ `auto_scale_wa.py`): a candidate
runs as Q_a(x / s) @ Q(W diag(s))^T against the FP module on FP inputs; MBQ with equal token weights is AWQ's
search; weights-only formats take the weight-only path exactly as before.

The numerical comparison with thu-nics/MBQ's `auto_scale_block_wa` on one decoder layer was done outside the
repository; see docs/methods.md (MBQ)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from _helpers import outlier_model  # noqa: E402

from ptqbench.engine.blockwise import quantize_model
from ptqbench.methods import QuantSpec, get_method
from ptqbench.methods.base import Method
from ptqbench.methods.quant import quantize_activation, quantize_rtn
from ptqbench.methods.scale_search import (
    MSE_ALL,
    ScaledInputQuantizer,
    alpha_grid,
    fake_quant_weight,
    scales_for,
    search_block_scales,
)
from ptqbench.models.adapters import adapter_for

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

W4A8 = QuantSpec(bits=4, group_size=-1, sym=True, act_bits=8)  # MBQ's own W4A8 weight format


class _Probe(Method):
    """Runs the shared search with AWQ's loss and keeps, per block, the results, the captured inputs, the
    masks and the FP down_proj (the single-linear group whose loss the tests recompute by hand)."""

    name = "scale-search-probe"
    streams = "fp"
    seen: dict = {}

    def quantize_block(self, block):
        results, inputs = search_block_scales(block, self.spec, alpha_grid(), lambda g: MSE_ALL)
        down = block.fp_block.get_submodule(block.layout.down)
        _Probe.seen[(self.spec, block.index)] = dict(
            results=results, xs=inputs[block.layout.down], w=down.weight.detach().clone(),
            masks=[block.masks(b)["valid"] for b in range(block.n_batches)])
        for n in block.linear_names:
            block.commit(n, quantize_rtn(block.weight(n), self.spec))


def _probe(model, calib, spec, blocks=1):
    m = copy.deepcopy(model)
    quantize_model(m, adapter_for(m), calib, _Probe(spec), max_blocks=blocks)
    return [_Probe.seen[(spec, i)] for i in range(blocks)]


def _down_losses(seen, spec, candidate):
    """AWQ's loss (MSE over valid tokens x channels) of the down_proj group for every alpha, by hand."""
    xs, w, masks = seen["xs"], seen["w"], seen["masks"]
    total = sum(x[m].float().abs().sum(0) for x, m in zip(xs, masks))
    x_mean = total / sum(int(m.sum()) for m in masks)
    out = []
    for alpha in alpha_grid():
        s = scales_for(x_mean, alpha)
        num = den = 0.0
        for x, m in zip(xs, masks):
            d = (candidate(x, w, s) - F.linear(x, w))[m]
            num, den = num + float(d.pow(2).sum()), den + d.numel()
        out.append(num / den)
    return out


def test_wa_candidate_quantizes_the_scaled_input_and_the_scaled_weight(tiny_qwen, tiny_calib):
    """Each alpha's loss is that of Q_a(x / s) @ Q(W diag(s))^T (MBQ's WALinear on x / s), not of the
    weight-only candidate; and the chosen scales are that alpha's."""
    spec = QuantSpec(bits=4, group_size=-1, sym=True, act_bits=4)
    seen = _probe(outlier_model(tiny_qwen[0]), tiny_calib, spec)[0]
    down = seen["results"][-1]
    assert down.inspect == "mlp.down_proj"

    def wa(x, w, s):
        return F.linear(quantize_activation(x / s, spec.act_bits), fake_quant_weight(w * s[None, :], spec))

    def weight_only(x, w, s):
        return F.linear(x, fake_quant_weight(w * s[None, :], spec) / s[None, :])

    want = _down_losses(seen, spec, wa)
    assert down.history == pytest.approx(want, rel=1e-5)
    # activation quantization is in the loss: the weight-only candidate's losses are clearly different
    other = _down_losses(seen, spec, weight_only)
    assert all(h > 1.05 * o for h, o in zip(down.history, other)), (down.history, other)
    xs, masks = seen["xs"], seen["masks"]
    x_mean = sum(x[m].abs().sum(0) for x, m in zip(xs, masks)) / sum(int(m.sum()) for m in masks)
    torch.testing.assert_close(down.scales, scales_for(x_mean, down.alpha))


def test_wa_search_chooses_other_alphas_than_the_weight_only_search(tiny_qwen, tiny_calib):
    """On the outlier model at A4 the activation quantizer changes the choice: the search is not the
    weight-only search with a quantizer bolted on afterwards."""
    model = outlier_model(tiny_qwen[0])
    wa = _probe(model, tiny_calib, QuantSpec(bits=4, group_size=-1, sym=True, act_bits=4))[0]["results"]
    wo = _probe(model, tiny_calib, QuantSpec(bits=4, group_size=-1, sym=True))[0]["results"]
    assert [r.prev_name for r in wa] == [r.prev_name for r in wo]  # the same groups
    assert [r.alpha for r in wa] != [r.alpha for r in wo], [(r.alpha, q.alpha) for r, q in zip(wa, wo)]


def test_weight_only_search_is_the_weight_only_formula_exactly(tiny_qwen, tiny_calib, monkeypatch):
    """act_bits 16: no input quantizer is ever called, and every alpha's loss is the weight-only candidate
    Q(W diag(s)) diag(s)^-1 on FP inputs, bit for bit."""
    calls = []
    monkeypatch.setattr(ScaledInputQuantizer, "__call__", lambda self, mod, args: calls.append(1) or args)
    spec = QuantSpec(bits=3, group_size=32)
    seen = _probe(outlier_model(tiny_qwen[0]), tiny_calib, spec)[0]
    assert not calls
    tokens = MSE_ALL

    def losses():
        xs, w, masks = seen["xs"], seen["w"], seen["masks"]
        total = torch.zeros(xs[0].shape[-1])
        for x, m in zip(xs, masks):
            total += x[m].float().abs().sum(0)
        x_mean = total / max(sum(int(m.sum()) for m in masks), 1)
        out = []
        for alpha in alpha_grid():
            s = scales_for(x_mean, alpha)
            wq = (fake_quant_weight(w.float() * s[None, :], spec) / s[None, :]).to(w.dtype)
            acc = sum(tokens.partial(F.linear(x, wq), F.linear(x, w), {"valid": m}) for x, m in zip(xs, masks))
            out.append(tokens.value(acc))
        return out

    assert seen["results"][-1].history == losses()  # exact, not approximate
    _probe(outlier_model(tiny_qwen[0]), tiny_calib, QuantSpec(bits=3, group_size=32, act_bits=8))
    assert calls  # the same probe at A8 does take the weight-activation path


@pytest.mark.parametrize("spec", [W4A8, QuantSpec(bits=4, group_size=32, act_bits=6)])
def test_mbq_with_equal_token_weights_is_awqs_weight_activation_search(tiny_qwen, tiny_calib, spec):
    def run(name, **opts):
        m = copy.deepcopy(tiny_qwen[0])
        return quantize_model(m, adapter_for(m), tiny_calib, get_method(name)(spec, **opts), max_blocks=2)

    a = run("mbq", loss="mse", token_weights="uniform")
    b = run("awq", clip=False)
    assert a.quantized.keys() == b.quantized.keys()
    for n, qa in a.quantized.items():
        assert torch.equal(qa.qweight, b.quantized[n].qweight), n
        assert torch.equal(qa.scale, b.quantized[n].scale) and torch.equal(qa.zero, b.quantized[n].zero), n
    assert a.method_info["alpha"] == b.method_info["alpha"]


def test_mbq_modality_loss_runs_at_w4a8_and_beats_rtn(tiny_qwen, tiny_calib):
    """MBQ's modality-weighted search at W4A8 (MBQ's format): the block error on FP inputs, with the
    activation quantizer deployed, is below RTN's at the same format."""
    model = outlier_model(tiny_qwen[0])
    errs = {}
    for name in ("mbq", "rtn"):
        m = copy.deepcopy(model)
        res = quantize_model(m, adapter_for(m), tiny_calib, get_method(name)(W4A8))
        errs[name] = [b["block_on_fp_input"]["all"] for b in res.diagnostics["blocks"].values()]
        assert all(not mod._forward_pre_hooks for mod in m.modules())  # no search hook left behind
    assert sum(errs["mbq"]) < sum(errs["rtn"]), errs
