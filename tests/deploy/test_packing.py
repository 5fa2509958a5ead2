"""Packed low-bit storage: bit-exact round trips, real density, safetensors files."""

import math

import pytest
import torch

from ptqbench.errors import BadInput
from ptqbench.deploy.packing import load_quantized, pack, pack_bits, packed_nbytes, save_quantized, unpack, unpack_bits
from ptqbench.methods.quant import QuantizedWeight, QuantSpec, quantize_rtn


def random_qw(bits, group_size, out=48, inp=256, sym=False, seed=0, permute=True) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    spec = QuantSpec(bits=bits, group_size=group_size, sym=sym)
    gs = spec.groups_for(inp)
    g_idx = torch.arange(inp) // gs
    if permute:  # act-order: columns visit groups in a shuffled order
        g_idx = g_idx[torch.randperm(inp, generator=g)]
    n_groups = inp // gs
    scale = (torch.rand(out, n_groups, generator=g) * 0.1 + 1e-3).half().float()  # fp16-representable
    zero = torch.randint(0, 2**bits, (out, n_groups), generator=g).float()
    q = torch.randint(0, 2**bits, (out, inp), generator=g, dtype=torch.uint8)
    return QuantizedWeight(q, scale, zero, g_idx.int(), spec)


def assert_same(a: QuantizedWeight, b: QuantizedWeight):
    for name in ("qweight", "scale", "zero", "g_idx"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert a.spec == b.spec
    assert torch.equal(a.dequantize(), b.dequantize())


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("group_size", [-1, 32])
def test_round_trip_bit_exact(bits, group_size):
    qw = random_qw(bits, group_size, seed=bits)
    assert_same(unpack(pack(qw)), qw)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 5, 31, 33, 100])
def test_pack_bits_any_width(bits, n):
    codes = torch.randint(0, 2**bits, (3, n), dtype=torch.uint8)
    words = pack_bits(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (3, math.ceil(n * bits / 32))
    assert torch.equal(unpack_bits(words, bits, n), codes)


def test_layouts_are_dense_bit_streams():
    # 4-bit: nibbles little-endian within a word; 3-bit: code 10 straddles words 0 and 1.
    assert pack_bits(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), 4).item() & 0xFFFFFFFF == 0x87654321
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 10] = 0b111  # bits 30..32
    w = pack_bits(codes, 3)[0]
    assert w.tolist() == [-(2**31) + 2**30, 1, 0]  # bits 30, 31 of word 0 and bit 0 of word 1


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_size_is_bits_per_weight(bits):
    out, inp, gs = 256, 4096, 128
    t = pack(random_qw(bits, gs, out=out, inp=inp))
    assert packed_nbytes({"qweight": t["qweight"]}) == out * inp * bits // 8  # exactly dense codes
    per_weight = packed_nbytes(t) / (out * inp)
    overhead = (16 + bits) / gs / 8 + 4 / out  # fp16 scale + packed zero per group, int32 g_idx per column
    assert bits / 8 < per_weight <= bits / 8 + overhead + 1e-3


def test_scales_fp16_by_default_fp32_on_request():
    qw = random_qw(4, 32)
    qw.scale = qw.scale + 1e-7  # not representable in fp16 any more
    half = unpack(pack(qw))
    assert torch.equal(half.scale, qw.scale.half().float()) and torch.equal(half.qweight, qw.qweight)
    assert_same(unpack(pack(qw, scale_dtype=torch.float32)), qw)


def test_off_grid_zeros_kept_exactly():
    qw = random_qw(3, 64)
    qw.zero = qw.zero + 0.5
    t = pack(qw)
    assert "zeros" in t and "qzeros" not in t
    assert_same(unpack(t), qw)


def test_real_rtn_weight_round_trip():
    w = torch.randn(64, 256)
    for spec in (QuantSpec(bits=3, group_size=64), QuantSpec(bits=4, group_size=-1, sym=True, grid="gptq")):
        qw = quantize_rtn(w, spec)
        assert_same(unpack(pack(qw, scale_dtype=torch.float32)), qw)


def test_bad_input():
    qw = random_qw(2, 32)
    qw.qweight[0, 0] = 7
    with pytest.raises(BadInput, match="outside"):
        pack(qw)
    with pytest.raises(BadInput, match="lacks"):
        unpack({"qweight": torch.zeros(1, dtype=torch.int32)})


def test_safetensors_round_trip(tmp_path):
    named = {"layers.0.q_proj": random_qw(3, 32, seed=1), "layers.0.o_proj": random_qw(4, -1, seed=2)}
    emb = torch.randn(100, 16)
    other = {"embed.weight": emb, "lm_head.weight": emb, "norm.weight": torch.ones(16, dtype=torch.bfloat16)}
    path = tmp_path / "model.safetensors"
    size = save_quantized(path, named, other, {"method": "gptq", "bits": 3})
    weights, state, meta = load_quantized(path)
    assert meta == {"method": "gptq", "bits": 3}
    assert weights.keys() == named.keys()
    for k in named:
        assert_same(weights[k], named[k])
    assert state.keys() == other.keys()
    assert all(torch.equal(state[k], other[k]) and state[k].dtype == other[k].dtype for k in other)
    payload = sum(packed_nbytes(pack(q)) for q in named.values()) + sum(t.numel() * t.element_size() for t in other.values())
    assert payload <= size < payload + 4096  # the file is the packed tensors plus a small header
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary left behind
    with pytest.raises(BadInput):
        save_quantized(path, named, {"layers.0.q_proj": emb})


def test_load_garbage_is_bad_input(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"\x00" * 100)
    with pytest.raises(BadInput):
        load_quantized(p)
    with pytest.raises(BadInput):
        load_quantized(tmp_path / "missing.safetensors")
