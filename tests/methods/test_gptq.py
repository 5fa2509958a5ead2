"""GPTQ pinned against RTN: identity Hessian reproduces RTN exactly, real Hessians beat it, runs repeat."""

import copy

import pytest
import torch

from ptqbench.models.adapters import adapter_for
from ptqbench.engine.blockwise import quantize_model
from ptqbench.methods import QuantSpec, get_method
from ptqbench.methods.gptq import solve
from ptqbench.methods.quant import quantize_rtn


@pytest.mark.parametrize("group_size", [-1, 16, 32])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("static_groups", [False, True])
def test_identity_hessian_equals_rtn(group_size, sym, static_groups):
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    spec = QuantSpec(bits=3, group_size=group_size, sym=sym)
    q = solve(w, torch.eye(64), spec, blocksize=16, static_groups=static_groups)
    r = quantize_rtn(w, spec)
    assert torch.equal(q.qweight, r.qweight)
    assert torch.equal(q.dequantize(), r.dequantize())


def test_act_order_with_static_groups_and_identity_equals_rtn():
    torch.manual_seed(1)
    w = torch.randn(8, 64)
    spec = QuantSpec(bits=4, group_size=16)
    q = solve(w, torch.eye(64), spec, act_order=True, static_groups=True)
    assert torch.equal(q.dequantize(), quantize_rtn(w, spec).dequantize())


def test_act_order_dynamic_groups_follow_permutation():
    torch.manual_seed(2)
    w, x = torch.randn(8, 64), torch.randn(64, 256) * torch.linspace(0.1, 3, 64)[:, None]
    q = solve(w, 2 * x @ x.T / 256, QuantSpec(bits=3, group_size=16), act_order=True)
    perm = torch.argsort(torch.diag(x @ x.T), descending=True)
    assert torch.equal(q.g_idx[perm].long(), torch.arange(64) // 16)  # groups in quantization order


def test_dead_columns_are_zeroed():
    torch.manual_seed(3)
    w, x = torch.randn(8, 32), torch.randn(32, 128)
    x[5] = 0  # an input channel that never fires
    q = solve(w, x @ x.T, QuantSpec(bits=4, group_size=-1))
    assert torch.allclose(q.dequantize()[:, 5], torch.zeros(8), atol=q.scale.max().item())


def _linear_inputs(model, adapter, calib):
    """Inputs to every decoder linear of the FP model on the calibration set (valid tokens only)."""
    xs: dict[str, list] = {}
    hooks = []
    for i, blk in enumerate(adapter.decoder_layers()):
        for n, m in adapter.block_linears(blk).items():
            hooks.append(m.register_forward_pre_hook(lambda mod, a, k=f"{i}.{n}": xs.setdefault(k, []).append(a[0])))
    with torch.no_grad():
        for b in calib.batches:
            valid = b.masks["valid"]
            adapter.replay(b.hidden, b.kwargs, b.extras)
            for k in xs:
                xs[k][-1] = xs[k][-1][valid]
    for h in hooks:
        h.remove()
    return {k: torch.cat(v).float() for k, v in xs.items()}


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_layer_error_below_rtn_on_every_layer(tiny_qwen, tiny_calib, bits):
    model, _ = tiny_qwen
    adapter = adapter_for(model)
    xs = _linear_inputs(model, adapter, tiny_calib)
    spec = QuantSpec(bits=bits, group_size=32)
    assert len(xs) == 7 * len(adapter.decoder_layers())
    for key, x in xs.items():
        i, n = key.split(".", 1)
        w = adapter.decoder_layers()[int(i)].get_submodule(n).weight.data
        H = 2 * x.T @ x / len(x)
        err = lambda wq: ((wq - w) @ x.T).pow(2).sum().item()  # noqa: E731
        e_gptq, e_rtn = err(solve(w, H, spec).dequantize()), err(quantize_rtn(w, spec).dequantize())
        assert e_gptq < e_rtn, f"layer {key} w{bits}: gptq {e_gptq:.4g} >= rtn {e_rtn:.4g}"


def test_gptq_beats_rtn_end_to_end_and_is_bit_identical(tiny_qwen, tiny_calib):
    model, _ = tiny_qwen
    spec = QuantSpec(bits=3, group_size=32)
    results = []
    for name in ("gptq", "gptq", "rtn"):
        m = copy.deepcopy(model)
        torch.manual_seed(0)
        results.append(quantize_model(m, adapter_for(m), tiny_calib, get_method(name)(spec)))
    a, b, rtn = results
    assert a.quantized.keys() == b.quantized.keys()
    for k in a.quantized:
        assert torch.equal(a.quantized[k].qweight, b.quantized[k].qweight)
        assert torch.equal(a.quantized[k].scale, b.quantized[k].scale)
    last = max(a.diagnostics["blocks"])
    assert a.diagnostics["blocks"][last]["stream"]["all"] < rtn.diagnostics["blocks"][last]["stream"]["all"]


def test_solves_run_together_give_each_what_it_gets_alone():
    """solve_many over problems of one column count (rows, bits, cross term, damping, alpha and dead columns
    differing) returns, bit for bit, each problem's solve alone, with act-order too; a problem whose set-up
    fails gets its own exception and the others are unaffected."""
    from ptqbench.methods.gptq import Solve, solve_many

    torch.manual_seed(3)
    for static_groups in (False, True):
        items = []
        for k, rows in enumerate((24, 8, 16, 24, 8)):
            x = torch.randn(64, 200) * torch.linspace(0.1, 3, 64)[:, None]
            H = 2 * x @ x.T / 200
            if k == 1:
                H[5, :] = H[:, 5] = 0  # a dead column
            items.append(Solve(torch.randn(rows, 64), H, QuantSpec(bits=2 + k % 3, group_size=16), blocksize=16,
                               percdamp=0.01 * (1 + k % 2), act_order=k in (0, 3), static_groups=static_groups,
                               dXXT=torch.randn(64, 64) * 0.01 if k % 2 else None, alpha=0.25 + 0.25 * (k % 2)))
        items.append(Solve(torch.randn(8, 64), -torch.eye(64), QuantSpec(bits=3, group_size=16), blocksize=16,
                           static_groups=static_groups))
        got = solve_many(items)
        assert isinstance(got[-1], Exception)  # not positive definite: this problem only
        for s, q in zip(items[:-1], got[:-1]):
            alone = solve(s.weight, s.H, s.spec, blocksize=16, percdamp=s.percdamp, act_order=s.act_order,
                          static_groups=static_groups, dXXT=s.dXXT, alpha=s.alpha)
            for a, b in ((q.qweight, alone.qweight), (q.scale, alone.scale), (q.zero, alone.zero), (q.g_idx, alone.g_idx)):
                assert torch.equal(a, b)
        assert len({s.key() for s in items}) == 1  # rows, bits, act-order, cross term, damping: one batch
