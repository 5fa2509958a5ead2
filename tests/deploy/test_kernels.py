"""Deployment kernels: every kernel against the dequantized matmul, deploy on the tiny model, sizes."""

import copy

import pytest
import torch
from torch import nn

from ptqbench.errors import BadInput
from ptqbench.deploy import kernels as K
from ptqbench.deploy.kernels import QuantLinear, auto_kernel, deploy, kernel_label, kernel_unsupported, model_nbytes
from ptqbench.methods.quant import QuantizedWeight, QuantSpec, quantize_rtn

CPU = torch.device("cpu")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _weight(out_f=64, in_f=256, bits=4, group=64, sym=False, permute=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    qw = quantize_rtn(w, QuantSpec(bits=bits, group_size=group, sym=sym))
    if permute:  # act-order: columns of one group scattered over the row, every group still of equal size
        p = torch.randperm(in_f, generator=g)
        qw = QuantizedWeight(qw.qweight[:, p], qw.scale, qw.zero, qw.g_idx[p], qw.spec)
    return qw


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _check(layer, qw, dtype, bias=None, shape=(2, 3)):
    x = torch.randn(*shape, qw.qweight.shape[1]).to(dtype)
    ref = x.float() @ qw.dequantize().t()
    if bias is not None:
        ref = ref + bias.to(dtype).float()
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == dtype and y.shape == (*shape, qw.qweight.shape[0])
    err = _rel(y, ref)
    assert err < TOL[dtype], f"{layer.kernel} {dtype}: relative error {err:.2e}"
    return err


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [32, 96, 100, 7])
def test_bit_planes_roundtrip_and_size(bits, n):
    assert sum(w for w, _ in K.bit_planes(bits)) == bits
    q = torch.randint(0, 2**bits, (5, n), dtype=torch.uint8)
    packed = K.pack_planes(q, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, bits * (-(-n // 32) * 4))  # b bits a code
    assert torch.equal(K.unpack_planes(packed, bits)[:, :n], q)


LAYOUTS = {"per-channel": dict(group=-1), "g32": dict(group=32), "g64-act-order": dict(group=64, permute=True),
           "g128-sym": dict(group=128, sym=True)}
# What each kernel must run (on CPU): int4pack any <= 4-bit with groups of equal size, int8pack per-channel.
MUST = {"int4pack": lambda bits, lay: bits <= 4, "int8pack": lambda bits, lay: lay == "per-channel",
        "dequant": lambda bits, lay: True, "fake": lambda bits, lay: True,
        "int8dyn": lambda bits, lay: False}  # int8dyn runs weight-activation layers only (tests/deploy/test_wa_kernels.py)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kernel", K.KERNELS)
def test_kernel_matches_dequantized_matmul(kernel, bits, layout, dtype):
    qw = _weight(bits=bits, **LAYOUTS[layout])
    why = kernel_unsupported(qw, kernel, CPU, dtype)
    if not MUST[kernel](bits, layout):
        assert why is not None
        with pytest.raises(BadInput, match="cannot run this layer"):
            QuantLinear(qw, None, kernel, dtype)
        return
    assert why is None, why
    bias = torch.randn(qw.qweight.shape[0])
    layer = QuantLinear(qw, bias, kernel, dtype)
    assert (layer.perm is not None) == (layout == "g64-act-order" and kernel in ("int4pack", "dequant"))
    _check(layer, qw, dtype, bias)
    _check(layer, qw, dtype, None if bias is None else bias, shape=(1,))  # one token (decode)


@pytest.mark.parametrize("kernel", ["int4pack", "int8pack", "dequant"])
def test_fp16_activations(kernel):
    qw = _weight(bits=4, group=-1 if kernel == "int8pack" else 64)
    _check(QuantLinear(qw, None, kernel, torch.float16), qw, torch.float16)


def test_off_grid_zeros_and_unequal_groups():
    qw = _weight(bits=4, group=64)
    off = QuantizedWeight(qw.qweight, qw.scale, qw.zero + 0.37, qw.g_idx, qw.spec)  # a method's float zeros
    for kernel in ("int4pack", "dequant", "fake"):
        _check(QuantLinear(off, None, kernel), off, torch.float32)
    ch = _weight(bits=8, group=-1)
    off8 = QuantizedWeight(ch.qweight, ch.scale, ch.zero - 3.25, ch.g_idx, ch.spec)
    layer = QuantLinear(off8, None, "int8pack")
    assert layer.corr is not None
    _check(layer, off8, torch.float32)
    # groups of unequal size: only a per-column gather can apply them
    sizes = (100, 28, 64, 64)
    g_idx = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)]).int()
    uneq = QuantizedWeight(qw.qweight, qw.scale, qw.zero, g_idx, qw.spec)
    assert K.group_layout(uneq) == (None, None)
    assert "equal size" in kernel_unsupported(uneq, "int4pack", CPU, torch.bfloat16)
    layer = QuantLinear(uneq, None, "dequant")
    assert layer.G is None
    _check(layer, uneq, torch.float32)


def test_int4pack_group_and_shape_limits():
    assert "16" in kernel_unsupported(_weight(out_f=40, group=32), "int4pack", CPU, torch.bfloat16)
    assert "multiple of 32" in kernel_unsupported(_weight(group=16), "int4pack", CPU, torch.bfloat16)
    assert "at most 4-bit" in kernel_unsupported(_weight(bits=5), "int4pack", CPU, torch.bfloat16)
    assert "per-channel" in kernel_unsupported(_weight(bits=8, group=64), "int8pack", CPU, torch.bfloat16)
    big = _weight(in_f=1024, group=512)  # a coarser group runs as 256-wide sub-groups with repeated scales
    layer = QuantLinear(big, None, "int4pack", torch.bfloat16)
    assert layer.kgroup == 256 and layer.scales_and_zeros.shape == (4, 64, 2)
    _check(layer, big, torch.bfloat16)


def test_auto_rule():
    bf, fp = torch.bfloat16, torch.float32
    assert auto_kernel(_weight(bits=4), CPU, bf) == "int4pack"
    assert auto_kernel(_weight(bits=8, group=-1), CPU, bf) == "int8pack"
    assert auto_kernel(_weight(bits=8, group=64), CPU, bf) == "dequant"
    assert auto_kernel(_weight(bits=3), CPU, bf) == "dequant"
    assert auto_kernel(_weight(bits=3), CPU, bf, widen=True) == "int4pack"
    assert auto_kernel(_weight(bits=4, group=-1), CPU, bf, widen=True) == "int4pack"
    assert auto_kernel(_weight(bits=4, group=16), CPU, bf) == "dequant"
    for bits, group in ((2, 64), (4, 64), (8, -1)):  # fp32/fp16 on CPU: no aten path beats dequant (module docstring)
        for dtype in (fp, torch.float16):
            assert auto_kernel(_weight(bits=bits, group=group), CPU, dtype) == "dequant"


# ---- deploy on the tiny model ----------------------------------------------------------------------
def _decoder_rtn(model, spec):
    from ptqbench.models.adapters import adapter_for

    ad = adapter_for(model)
    return {f"{ad.decoder_path}.{i}.{n}": quantize_rtn(m.weight.data, spec)
            for i, blk in enumerate(ad.decoder_layers()) for n, m in ad.block_linears(blk).items()}


def _fake_quant(model, quantized, dtype):
    fq = copy.deepcopy(model)
    for name, qw in quantized.items():
        fq.get_submodule(name).weight.data = qw.dequantize()
    return fq.to(dtype)


def _logits(model, inputs, dtype):
    with torch.no_grad():
        kw = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
        return model(**kw).logits.float()


@pytest.fixture(scope="module")
def tiny_batch_inputs(tiny_qwen):
    from ptqbench.models.tiny import tiny_batch, tiny_inputs

    return dict(tiny_inputs(tiny_qwen[1], tiny_batch(n=2)))


@pytest.mark.parametrize("kernel,bits,group,dtype,tol", [
    ("auto", 4, 32, torch.float32, 1e-4),
    ("int4pack", 4, 32, torch.float32, 1e-4),
    ("auto", 4, 32, torch.bfloat16, 3e-2),
    ("auto", 8, -1, torch.bfloat16, 3e-2),
    ("dequant", 3, 32, torch.float32, 1e-4),
    ("fake", 2, 32, torch.float32, 1e-5),
])
def test_deploy_tiny_model_matches_fake_quant(tiny_qwen, tiny_batch_inputs, kernel, bits, group, dtype, tol):
    model = copy.deepcopy(tiny_qwen[0])
    quantized = _decoder_rtn(model, QuantSpec(bits=bits, group_size=group))
    ref = _logits(_fake_quant(model, quantized, dtype), tiny_batch_inputs, dtype)
    used = deploy(model, quantized, kernel, dtype=dtype)
    assert set(used) == set(quantized)
    expect = {"auto": K.auto_kernel(next(iter(quantized.values())), CPU, dtype)}.get(kernel, kernel)
    assert set(used.values()) == {expect}
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in quantized)
    assert kernel_label(model) == f"{expect}[{ {torch.float32: 'fp32', torch.bfloat16: 'bf16'}[dtype] }]"
    got = _logits(model, tiny_batch_inputs, dtype)
    assert _rel(got, ref) < tol


def test_deploy_falls_back_and_refuses(tiny_qwen, monkeypatch):
    model = copy.deepcopy(tiny_qwen[0])
    quantized = _decoder_rtn(model, QuantSpec(bits=4, group_size=32))
    name = next(iter(quantized))
    with pytest.raises(BadInput, match="kernel"):
        deploy(copy.deepcopy(model), quantized, "int3pack")
    with pytest.raises(BadInput, match="names no module"):
        deploy(copy.deepcopy(model), {"model.nope": quantized[name]})
    with pytest.raises(BadInput, match="not an nn.Linear"):
        deploy(copy.deepcopy(model), {"model.language_model.norm": quantized[name]})
    # a named kernel that cannot run a layer: dequant for that layer, with the reason
    used = deploy(copy.deepcopy(model), _decoder_rtn(model, QuantSpec(bits=8, group_size=32)), "int8pack")
    assert set(used.values()) == {"dequant"}
    # a kernel that computes something wrong is caught by verify and replaced
    real = QuantLinear._mm

    def broken(self, x2):
        out = real(self, x2)
        return out * 1.5 if self.kernel == "int4pack" else out

    monkeypatch.setattr(QuantLinear, "_mm", broken)
    m2 = copy.deepcopy(model)
    used = deploy(m2, quantized, "int4pack", dtype=torch.bfloat16)
    assert set(used.values()) == {"dequant"}
    assert "relative error" in m2.get_submodule(name).note


# ---- sizes -----------------------------------------------------------------------------------------
def test_model_nbytes_counts_what_is_held():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024, bias=False))
    fp = model_nbytes(m)
    assert fp == (1024 * 1024 * 2 + 1024) * 4
    q = {n: quantize_rtn(mod.weight.data, QuantSpec(4, 128)) for n, mod in m.named_children()}
    for kernel, dtype, lo, hi in (("dequant", torch.float32, 7.0, 7.5), ("int4pack", torch.bfloat16, 7.0, 7.6),
                                  ("fake", torch.float32, 0.99, 1.01)):
        mm = copy.deepcopy(m)
        deploy(mm, q, kernel, dtype=dtype)
        ratio = fp / model_nbytes(mm)
        assert lo < ratio < hi, (kernel, ratio)
    # 4-bit g128 dequant holds exactly: codes, fp32 scales, uint8 zeros (+ the fp32 bias)
    mm = copy.deepcopy(m)
    deploy(mm, q, "dequant")
    assert model_nbytes(mm) == 2 * (1024 * 512 + 1024 * 8 * 4 + 1024 * 8) + 1024 * 4


def test_model_nbytes_tied_and_tiny(tiny_qwen):
    emb = nn.Embedding(100, 64)
    head = nn.Linear(64, 100, bias=False)
    head.weight = emb.weight
    assert model_nbytes(nn.ModuleList([emb, head])) == 100 * 64 * 4
    model = copy.deepcopy(tiny_qwen[0])
    quantized = _decoder_rtn(model, QuantSpec(bits=4, group_size=32))
    before = model_nbytes(model)
    linear = sum(qw.qweight.numel() for qw in quantized.values()) * 4
    deploy(model, quantized, "dequant")
    saved = before - model_nbytes(model)
    # 4 bytes -> 0.5 byte per weight, plus 5 bytes (fp32 scale, uint8 zero) per 32 weights
    assert saved == pytest.approx(linear * (1 - (0.5 + 5 / 32) / 4), rel=1e-6)
