"""VLMQ pinned against its base solvers and an independent gradient: uniform importance is GPTAQ (or
GPTQ) bit for bit; the factors are dL/dZ of the block-local attention MSE at each projection output
(checked against a perturbation-hook gradient), zero on padding, uniform (and recorded) where both
streams agree; linear and squared factors differ; a global scale of the factors changes nothing."""

import copy
import functools
import json

import pytest
import torch

from ptqbench.errors import BadInput
from ptqbench.models.adapters import adapter_for
from ptqbench.engine.blockwise import quantize_model
from ptqbench.methods import QuantSpec, get_method
from ptqbench.methods import vlmq as V

SPEC = QuantSpec(bits=3, group_size=32)
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")  # the tiny Qwen2-VL's attention projections


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py



def _same(a, b):
    return torch.equal(a.qweight, b.qweight) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero) \
        and torch.equal(a.g_idx, b.g_idx)


def _differing(a, b):
    return [k for k in a.quantized if not _same(a.quantized[k], b.quantized[k])]


@pytest.fixture(scope="module")
def quantize(tiny_qwen, tiny_calib):
    model, _ = tiny_qwen

    def q(method):
        m = copy.deepcopy(model)
        torch.manual_seed(0)
        return quantize_model(m, adapter_for(m), tiny_calib, method)

    return q


@pytest.fixture(scope="module")
def run(quantize):
    @functools.lru_cache(maxsize=None)
    def go(method, bits=3, **opts):
        return quantize(get_method(method)(QuantSpec(bits=bits, group_size=32), **opts))

    return go


def _prefix(result):
    return next(iter(result.quantized)).rsplit(".", 3)[0]


# ---- identities with the base solvers --------------------------------------------------------------
def test_uniform_importance_is_gptaq_bit_exact(run):
    v, a = run("vlmq", importance="uniform"), run("gptaq", act_order=True)  # VLMQ's default act_order=True
    assert v.quantized.keys() == a.quantized.keys()
    assert _differing(v, a) == []
    assert v.method_info["fallback_blocks"] == []


def test_uniform_importance_with_gptq_base_is_gptq_bit_exact(run):
    v, g = run("vlmq", importance="uniform", base="gptq", act_order=False), run("gptq")
    assert _differing(v, g) == []


def test_linear_and_squared_factors_differ_except_on_the_fallback_block(run):
    lin, sq, a = run("vlmq"), run("vlmq", factor="squared"), run("gptaq", act_order=True)
    p = _prefix(lin)
    block0 = [k for k in lin.quantized if k.startswith(f"{p}.0.")]
    # Block 0: both streams equal -> zero gradient -> uniform fallback -> exactly GPTAQ.
    for k in block0:
        assert _same(lin.quantized[k], a.quantized[k]) and _same(sq.quantized[k], a.quantized[k]), k
    diff = _differing(lin, sq)
    assert diff and not any(k in block0 for k in diff)
    assert any(k.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) for k in diff)
    assert _differing(lin, a)  # the importance weighting changes something


# ---- the importance factors ----------------------------------------------------------------------
class Probe(V.VLMQ):
    """VLMQ that keeps its factors and, per block, an independent gradient computed by adding a zero
    perturbation to each projection's output on the FP block (U path) and differentiating w.r.t. it."""

    def __init__(self, spec, **opts):
        super().__init__(spec, **opts)
        self.seen: list[dict] = []

    def importance(self, block):
        factors, info = super().importance(block)
        ref = {n: self._reference(block, n) for n in V.attention_projections(block).values()}
        masks = [block.masks(b) for b in range(block.n_batches)]
        self.seen.append(dict(index=block.index, factors=factors, ref=ref, masks=masks, info=info))
        return factors, info

    @staticmethod
    def _reference(block, name):
        out = []
        for b in range(block.n_batches):
            valid, kw = block.masks(b)["valid"], block.kwargs(b)
            fpb = block.fp_block
            with torch.no_grad():
                target = block.layout.attention_residual(fpb, block.stream("fp", b), kw)
            box = {}

            def hook(m, a, y):
                box["d"] = torch.zeros_like(y, requires_grad=True)
                return y + box["d"]

            h = fpb.get_submodule(name).register_forward_hook(hook)
            try:
                with torch.enable_grad():
                    y = block.layout.attention_residual(fpb, block.stream("quant", b), kw)
                    loss = (y - target)[valid].pow(2).sum()
                    (gd,) = torch.autograd.grad(loss, box["d"])
            finally:
                h.remove()
            out.append(torch.where(valid, gd.abs().mean(-1), torch.zeros(())))
        return out


@pytest.fixture(scope="module")
def probe(quantize):
    p = Probe(SPEC, normalize=False)
    return p, quantize(p)


def test_factors_are_block_local_attention_gradients(probe):
    p, result = probe
    assert [s["index"] for s in p.seen] == [0, 1, 2]
    for s in p.seen[1:]:  # block 0 falls back (checked below)
        assert s["info"]["fallback"] is False
        assert set(s["factors"]) == set(s["ref"])  # only q/k/v/o are weighted; the MLP is not
        for name, ref in s["ref"].items():
            got = s["factors"][name]
            for b, (g, r) in enumerate(zip(got, ref)):
                valid = s["masks"][b]["valid"]
                assert g.shape == valid.shape  # (B, T) whatever the projection width (GQA: k/v narrower)
                assert torch.allclose(g, r, rtol=1e-4, atol=1e-12 * float(r.abs().max())), (s["index"], name, b)
                assert torch.all(g[~valid] == 0) and (g[valid] > 0).float().mean() > 0.95
    assert any(bool((~m["valid"]).any()) for m in p.seen[1]["masks"])  # padding really was there
    # q, k, v get different factors (no sharing)
    f = p.seen[1]["factors"]
    names = list(p.seen[1]["ref"])
    assert not torch.allclose(f[names[0]][0], f[names[1]][0]) and not torch.allclose(f[names[1]][0], f[names[2]][0])


def test_fallback_and_diagnostics_recorded(probe):
    p, result = probe
    info = result.method_info
    json.dumps(info)  # stored with the run
    blocks = info["blocks"]
    assert blocks[0]["fallback"] is True and sorted(blocks[0]["fallback_projections"]) == sorted(ATTN_PROJ)
    assert blocks[0]["attn_mse_per_token"] == 0.0
    assert info["fallback_blocks"] == [blocks[0]["block"]]
    for b in blocks[1:]:
        assert b["fallback"] is False and b["attn_mse_per_token"] > 0
        for role in ATTN_PROJ:
            st = b["g"][role]
            assert st["raw_mean"] > 0 and st["mean_vision"] > 0 and st["mean_text"] > 0 and st["vision_over_text"] > 0
    # block 0 got uniform weights on the attention projections, nothing on the MLP
    f0 = p.seen[0]["factors"]
    assert set(n.rsplit(".", 1)[-1] for n in f0) == set(ATTN_PROJ)
    for gs in f0.values():
        for g, m in zip(gs, p.seen[0]["masks"]):
            assert torch.equal(g, m["valid"].float())


def test_global_scale_of_factors_changes_nothing(probe, quantize, run, monkeypatch):
    """H and dXXT are both weighted: a global scale cancels in P and in the relative damping. A power
    of two keeps every floating-point step exact, so the result must be bit-identical; the default
    per-block mean normalisation (not a power of two) may flip rounding ties, and one flip cascades
    through GPTQ's error feedback, so it is held to the same output error instead of the same codes."""
    _, base = probe
    normed = run("vlmq")
    last = max(base.diagnostics["blocks"])
    e_base, e_norm = (r.diagnostics["blocks"][last]["stream"]["all"] for r in (base, normed))
    assert abs(e_norm - e_base) <= 0.05 * e_base, (e_norm, e_base)
    orig = V.gradient_importance

    def scaled(block, proj):
        g, loss = orig(block, proj)
        return {n: [x / 16 for x in gs] for n, gs in g.items()}, loss

    monkeypatch.setattr(V, "gradient_importance", scaled)
    res = quantize(V.VLMQ(SPEC, normalize=False))
    assert _differing(res, base) == []


def test_random_vision_weights(quantize):
    class Stop(Exception):
        pass

    class Catch(V.VLMQ):
        def quantize_block(self, block):
            self.got = (self.importance(block)[0], [block.masks(b) for b in range(block.n_batches)], list(block.linear_names))
            raise Stop

    c = Catch(SPEC, importance="random_vision", vision_drop=0.5, vision_weight=0.25)
    with pytest.raises(Stop):
        quantize(c)
    factors, masks, names = c.got
    assert set(factors) == set(names) and len(names) == 7  # every linear of the block, MLP included
    w = next(iter(factors.values()))
    for b, m in enumerate(masks):
        vis = m["vision"] & m["valid"]
        n_vis = int(vis.sum())
        assert n_vis > 0
        assert int((w[b][vis] == 0.25).sum()) == round(0.5 * n_vis)
        assert torch.all(w[b][vis] > 0)
        assert torch.all(w[b][m["valid"] & ~m["vision"]] == 1) and torch.all(w[b][~m["valid"]] == 0)
    # seeded: same seed -> same choice, another seed -> another choice
    c2, c3 = (Catch(SPEC, importance="random_vision", vision_weight=0.25, seed=s) for s in (0, 1))
    for x in (c2, c3):
        with pytest.raises(Stop):
            quantize(x)
    w2, w3 = next(iter(c2.got[0].values())), next(iter(c3.got[0].values()))
    assert all(torch.equal(a, b) for a, b in zip(w, w2)) and not all(torch.equal(a, b) for a, b in zip(w, w3))


@pytest.mark.parametrize("bits", [2, 3])
def test_vlmq_beats_rtn_on_every_block(run, bits):
    v, r = run("vlmq", bits=bits), run("rtn", bits=bits)
    for i in sorted(r.diagnostics["blocks"]):
        ev, er = v.diagnostics["blocks"][i]["stream"]["all"], r.diagnostics["blocks"][i]["stream"]["all"]
        assert ev < er, f"w{bits} block {i}: vlmq {ev:.4g} >= rtn {er:.4g}"


@pytest.mark.parametrize("opts", [dict(factor="cubic"), dict(base="awq"), dict(importance="attention"), dict(alpha="x"),
                                  dict(vision_drop=1.5), dict(vision_weight=-1.0)])
def test_bad_options_rejected(opts):
    with pytest.raises(BadInput):
        get_method("vlmq")(SPEC, **opts)
