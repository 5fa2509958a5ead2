"""The activation quantizer of weight-activation formats: per-token, dynamic, symmetric fake quantization
(SmoothQuant's `quantize_activation_per_token_absmax`, MBQ's WALinear), and `QuantSpec.act_bits`."""

import pytest
import torch
from torch import nn

from ptqbench.errors import BadInput
from ptqbench.methods.quant import QuantSpec, install_activation_quantizers, quantize_activation


def test_exact_on_a_hand_made_tensor():
    # 4 bits: q_max = 7; token 0 absmax 7 -> scale 1; token 1 absmax 14 -> scale 2 (per token, not per tensor)
    x = torch.tensor([[[7.0, -3.4, 0.6, 2.5], [14.0, -5.0, 1.1, -14.0]]])
    want = torch.tensor([[[7.0, -3.0, 1.0, 2.0], [14.0, -4.0, 2.0, -14.0]]])  # round half to even: 2.5 -> 2, -5/2 -> -2
    torch.testing.assert_close(quantize_activation(x, 4), want, rtol=0, atol=0)


def test_symmetric_and_all_zero_tokens_stay_zero():
    x = torch.randn(3, 5, 16)
    x[0, 2] = 0.0  # a padded (all-zero) token: the scale clamp keeps it finite and zero
    q = quantize_activation(x, 8)
    torch.testing.assert_close(quantize_activation(-x, 8), -q, rtol=0, atol=0)
    assert torch.equal(q[0, 2], torch.zeros(16)) and torch.isfinite(q).all()
    # at most 2^b - 1 distinct levels per token ([-q_max, q_max]: symmetric, the absmax maps onto q_max)
    q4 = quantize_activation(x, 4)
    assert all(len(torch.unique(t)) <= 15 for t in q4.reshape(-1, 16))


def test_idempotent_and_dtype_kept():
    x = torch.randn(2, 7, 32, dtype=torch.bfloat16)
    for bits in (4, 6, 8):
        q = quantize_activation(x, bits)
        assert q.dtype == torch.bfloat16
        x32 = torch.randn(2, 7, 32)
        q32 = quantize_activation(x32, bits)
        torch.testing.assert_close(quantize_activation(q32, bits), q32, rtol=0, atol=1e-6)


def test_8_bit_error_is_small_and_below_4_bit():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, 128, generator=g)
    rel = {b: float((quantize_activation(x, b) - x).pow(2).sum() / x.pow(2).sum()) for b in (4, 8)}
    assert rel[8] < 1e-4 and rel[8] < rel[4] / 100


def test_hooks_quantize_the_linear_input_and_come_off():
    lin = nn.Linear(8, 4)
    x = torch.randn(2, 3, 8)
    handles = install_activation_quantizers([lin], 4)
    torch.testing.assert_close(lin(x), nn.functional.linear(quantize_activation(x, 4), lin.weight, lin.bias))
    for h in handles:
        h.remove()
    torch.testing.assert_close(lin(x), nn.functional.linear(x, lin.weight, lin.bias))


def test_spec_act_bits_and_label():
    assert QuantSpec(bits=4, group_size=64).label == "w4g64"  # weight-only labels as they always were
    assert QuantSpec(bits=4, group_size=64, act_bits=16) == QuantSpec(bits=4, group_size=64)
    assert QuantSpec(bits=4, group_size=64, act_bits=8).label == "w4g64a8"
    assert not QuantSpec().quantizes_activations and QuantSpec(act_bits=4).quantizes_activations
    for bad in (3, 9, 15, 32, True, "8"):
        with pytest.raises(BadInput, match="act-bits"):
            QuantSpec(act_bits=bad)
