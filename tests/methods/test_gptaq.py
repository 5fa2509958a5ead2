"""GPTAQ pinned against GPTQ: a zero cross term (alpha = 0, or equal streams) is GPTQ bit for bit; the
cross term is applied, permuted with act-order on both axes and zeroed on dead columns; end to end it
beats RTN on every block and is no worse than GPTQ on the final stream error."""

import copy
import functools

import pytest
import torch

from ptqbench.models.adapters import adapter_for
from ptqbench.engine.blockwise import quantize_model
from ptqbench.methods import QuantSpec, get_method
from ptqbench.methods.gptq import solve



pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

def _problem(seed=0, rows=16, cols=64, n=512):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    xq = torch.randn(n, cols, generator=g) * torch.linspace(0.2, 2.0, cols)[torch.randperm(cols, generator=g)]
    xf = xq + 0.2 * torch.randn(n, cols, generator=g)
    return w, 2 * xq.T @ xq / n, 2 * (xf - xq).T @ xq / n, xq, xf


def _same(a, b):
    return torch.equal(a.qweight, b.qweight) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero) \
        and torch.equal(a.g_idx, b.g_idx)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("static_groups", [False, True])
@pytest.mark.parametrize("group_size", [-1, 16])
def test_zero_cross_term_is_gptq_bit_exact(act_order, static_groups, group_size):
    w, H, D, _, _ = _problem()
    spec = QuantSpec(bits=3, group_size=group_size)
    kw = dict(blocksize=32, act_order=act_order, static_groups=static_groups)
    ref = solve(w, H, spec, **kw)
    assert _same(solve(w, H, spec, dXXT=torch.zeros_like(D), **kw), ref)
    assert _same(solve(w, H, spec, dXXT=D, alpha=0.0, **kw), ref)
    assert not _same(solve(w, H, spec, dXXT=D, **kw), ref)  # the cross term is actually applied


def test_cross_term_lowers_asymmetric_objective():
    """GPTAQ's target ||W_hat X~ - W X||^2 with an FP input that depends on the quantized one (as a
    propagated quantization error does): the correction beats GPTQ, and alpha = 1 (the closed form
    under these normalisations) more than the reference's 0.25."""
    g = torch.Generator().manual_seed(0)
    rows, cols, n = 16, 64, 2048
    w = torch.randn(rows, cols, generator=g)
    xq = torch.randn(n, cols, generator=g) * torch.linspace(0.2, 2.0, cols)[torch.randperm(cols, generator=g)]
    xf = xq + 0.2 * xq @ torch.randn(cols, cols, generator=g) / cols ** 0.5 + 0.05 * torch.randn(n, cols, generator=g)
    H, D = 2 * xq.T @ xq / n, 2 * (xf - xq).T @ xq / n
    spec = QuantSpec(bits=3, group_size=-1)
    err = lambda qw: ((qw.dequantize() @ xq.T) - (w @ xf.T)).pow(2).sum().item()  # noqa: E731
    e_gptq, e_quarter, e_one = err(solve(w, H, spec)), err(solve(w, H, spec, dXXT=D)), err(solve(w, H, spec, dXXT=D, alpha=1.0))
    assert e_one < e_quarter < 0.95 * e_gptq  # observed 2.01e5 < 2.37e5 < 2.71e5


def test_act_order_permutes_cross_term_on_both_axes():
    """act-order == solving the explicitly permuted problem (W cols, H and dXXT rows and cols) and
    permuting back. Per-row grid (group -1) so the grid is permutation-free."""
    w, H, D, _, _ = _problem(seed=2)
    spec = QuantSpec(bits=3, group_size=-1)
    got = solve(w, H, spec, dXXT=D, act_order=True).dequantize()
    perm = torch.argsort(torch.diag(H), descending=True)
    back = torch.argsort(perm)
    ref = solve(w[:, perm], H[perm][:, perm], spec, dXXT=D[perm][:, perm]).dequantize()[:, back]
    assert torch.equal(got, ref)
    # dXXT permuted on one axis only is a different problem: it must not match.
    for one_axis in (D[perm], D[:, perm]):
        wrong = solve(w[:, perm], H[perm][:, perm], spec, dXXT=one_axis).dequantize()[:, back]
        assert (wrong != got).float().mean() > 0.01


def test_dead_columns_zero_cross_term_columns():
    w, H, D, _, _ = _problem(seed=3)
    H[5, :] = 0
    H[:, 5] = 0
    junk = D.clone()
    junk[:, 5] = 10.0  # a cross term inconsistent with a dead input channel
    clean = D.clone()
    clean[:, 5] = 0
    spec = QuantSpec(bits=4, group_size=-1, grid="gptq")  # grid contains 0 exactly
    a, b = solve(w, H, spec, dXXT=junk), solve(w, H, spec, dXXT=clean)
    assert _same(a, b)
    assert torch.all(a.dequantize()[:, 5] == 0)


# ---- end to end on the tiny Qwen2-VL -------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tiny_qwen, tiny_calib):
    model, _ = tiny_qwen

    @functools.lru_cache(maxsize=None)
    def go(method, bits, **opts):
        m = copy.deepcopy(model)
        torch.manual_seed(0)
        return quantize_model(m, adapter_for(m), tiny_calib, get_method(method)(QuantSpec(bits=bits, group_size=32), **opts))

    return lambda method, bits, **opts: go(method, bits, **opts)


def test_gptaq_alpha_zero_is_gptq_on_whole_model(run):
    a, g = run("gptaq", 3, alpha=0.0), run("gptq", 3)
    assert a.quantized.keys() == g.quantized.keys()
    for k in g.quantized:
        assert _same(a.quantized[k], g.quantized[k]), k


def test_gptaq_block0_qkv_is_gptq_and_cross_term_acts_later(run):
    """On block 0 both streams are equal, so the q/k/v cross term is exactly 0 and GPTAQ == GPTQ there;
    from o_proj on (inputs through the partly quantized block) the streams differ and so do results."""
    a, g = run("gptaq", 3), run("gptq", 3)
    prefix = next(iter(g.quantized)).rsplit(".", 3)[0]  # ...layers
    for n in ("q_proj", "k_proj", "v_proj"):
        k = f"{prefix}.0.self_attn.{n}"
        assert _same(a.quantized[k], g.quantized[k]), k
    differ = [k for k in g.quantized if not _same(a.quantized[k], g.quantized[k])]
    assert f"{prefix}.0.self_attn.o_proj" in differ
    assert any(k.startswith(f"{prefix}.2.") for k in differ)


@pytest.mark.parametrize("bits", [2, 3])
def test_gptaq_beats_rtn_on_every_block_and_matches_gptq(run, bits):
    a, g, r = run("gptaq", bits), run("gptq", bits), run("rtn", bits)
    blocks = sorted(r.diagnostics["blocks"])
    for i in blocks:
        ea, er = a.diagnostics["blocks"][i]["stream"]["all"], r.diagnostics["blocks"][i]["stream"]["all"]
        assert ea < er, f"w{bits} block {i}: gptaq {ea:.4g} >= rtn {er:.4g}"
    last = blocks[-1]
    ea, eg = a.diagnostics["blocks"][last]["stream"]["all"], g.diagnostics["blocks"][last]["stream"]["all"]
    # Observed on this model: w2 0.027 vs 0.046, w3 0.0036 vs 0.0084 (GPTAQ vs GPTQ). Assert only "no worse".
    assert ea <= eg * 1.05, f"w{bits}: gptaq final stream error {ea:.4g} vs gptq {eg:.4g}"
