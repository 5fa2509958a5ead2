import pytest
import torch

from ptqbench.errors import BadInput
from ptqbench.methods.quant import QuantSpec, grid_params, quantize_rtn


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("grid", ["minmax", "gptq"])
def test_rtn_codes_in_range_and_error_bounded(bits, sym, grid):
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    spec = QuantSpec(bits=bits, group_size=16, sym=sym, grid=grid)
    qw = quantize_rtn(w, spec)
    assert qw.qweight.min() >= 0 and qw.qweight.max() <= spec.maxq
    assert qw.scale.shape == (16, 4) and qw.g_idx.tolist() == [i // 16 for i in range(64)]
    err = (qw.dequantize() - w).abs()
    # Round-to-nearest: at most half a step, except where sym/zero-range clamps the extreme value.
    step = qw.scale[:, qw.g_idx.long()]
    assert (err <= step * (1.0 if sym else 0.5) + 1e-6).all()


def test_minmax_asym_matches_awq_formula():
    w = torch.tensor([[-1.0, 0.5, 2.0, 3.0]])
    s, z = grid_params(w, QuantSpec(bits=2, group_size=4))
    assert torch.allclose(s, torch.tensor([4.0 / 3]))
    assert z.item() == 1.0  # -round(-1/(4/3)) = 1


def test_gptq_grid_includes_zero():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # all positive: gptq widens the range to 0
    s, z = grid_params(w, QuantSpec(bits=4, group_size=4, grid="gptq"))
    assert z.item() == 0 and torch.allclose(s, torch.tensor([4.0 / 15]))


@pytest.mark.parametrize("kw", [dict(bits=1), dict(bits=9), dict(group_size=0), dict(grid="nf4")])
def test_spec_rejects_bad_values(kw):
    with pytest.raises(BadInput):
        QuantSpec(**kw)


def test_group_size_must_divide_width():
    with pytest.raises(BadInput, match="does not divide"):
        QuantSpec(bits=4, group_size=48).groups_for(64)
