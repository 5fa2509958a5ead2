"""Deployment kernels: run a quantized linear from its integer codes, so latency and size are measured.

`deploy(model, quantized)` replaces each named `nn.Linear` by a `QuantLinear` built from its
`QuantizedWeight` (W_hat = (q - z[:, g_idx]) * s[:, g_idx]) and returns name -> kernel used. KERNELS,
all plain torch:

- ``int4pack``: aten's "tinygemm" int4 matmuls; codes of up to 4 bits, groups of equal size that are
  a multiple of 32 (an act-order g_idx is run through a column permutation).
- ``int8pack``: aten's int8-weight matmul; per-channel codes of up to 8 bits.
- ``dequant``: codes held at exactly their bits (bit-planes), dequantized chunk by chunk on every
  forward; any bits, group size and g_idx. What 2/3-bit weights cost without a low-bit kernel.
- ``fake``: the dequantized weight as a dense tensor (the accuracy path; no memory saving).
- ``int8dyn`` (weight-activation formats, W8A8 / W4A8): per-channel int8 weight codes and per-token
  dynamic int8 activation codes multiplied exactly in int32 by ``torch._int_mm``, then scaled; the
  same numbers as the fake-quant reference up to fp32 rounding. CPU only (the one device measured).

A weight-activation layer (`QuantSpec.act_bits` < 16) on any other kernel fake-quantizes its input
(`quantize_activation`) before the weight kernel: labelled ``<kernel>+fakeA<bits>`` (`QuantLinear.label`),
so a latency row never passes a simulated activation quantizer off as an integer kernel.

`auto` (AUTO_RULE) picks per layer the fastest kernel that keeps the weight at its own width: on CPU
the aten kernels only with bf16 activations (with fp32/fp16 they are slower than ``dequant``), on
CUDA wherever they apply; for a weight-activation layer ``int8dyn`` wherever it is exact.
`deploy(verify=True)` checks every layer against the dequantized matmul (after the activation
quantizer, for a weight-activation layer) and falls back to ``dequant`` on any error or mismatch, so
a wrong convention cannot go unnoticed.
The kernels' layouts and conventions, and the measurements behind AUTO_RULE: docs/kernels.md.
"""

from __future__ import annotations

import threading
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from ptqbench.errors import BadInput, one_of
from ptqbench.methods.quant import QuantizedWeight, quantize_activation, quantize_activation_static

KERNELS = ("int4pack", "int8pack", "dequant", "fake", "int8dyn")
CHOICES = ("auto",) + KERNELS
INT4_GROUPS = (256, 128, 64, 32)  # group sizes the aten int4 kernels accept, largest first

# Relative Frobenius error allowed between a QuantLinear and x @ W_hat.T (computed in fp32 from the
# same, already-rounded input) when deploy(verify=True) checks a layer. The kernels' own rounding is
# ~1e-6 in fp32 and ~3e-3 in bf16 (scales rounded to bf16, bf16 accumulation of outputs); a wrong
# packing or zero convention gives O(1) errors.
VERIFY_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


# ---- grouping helpers ------------------------------------------------------------------------------
def group_layout(qw: QuantizedWeight) -> tuple[int | None, torch.Tensor | None]:
    """(contiguous group size G, column permutation or None) such that the columns `perm` of the
    weight form groups of G consecutive columns in group order; (None, None) when the groups have
    unequal sizes (then only a per-column gather of scales can apply them)."""
    in_f = qw.qweight.shape[1]
    ng = qw.scale.shape[1]
    g_idx = qw.g_idx.to(torch.long).cpu()
    if ng == 1:
        return in_f, None
    if in_f % ng:
        return None, None
    G = in_f // ng
    if torch.equal(g_idx, torch.arange(in_f) // G):
        return G, None
    counts = torch.bincount(g_idx, minlength=ng)
    if counts.numel() != ng or not bool((counts == G).all()):
        return None, None
    return G, torch.argsort(g_idx, stable=True)


def _int4_group(G: int | None) -> int | None:
    if G is None:
        return None
    return next((g for g in INT4_GROUPS if G % g == 0), None)


def kernel_unsupported(qw: QuantizedWeight, kernel: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `kernel` cannot run this weight on `device` in `dtype`, or None when it can."""
    bits = qw.spec.bits
    out_f = qw.qweight.shape[0]
    if kernel in ("dequant", "fake"):
        return None
    if kernel == "int8dyn":
        return _int8dyn_unsupported(qw, device, dtype)
    if device.type not in ("cpu", "cuda"):
        return f"{kernel} runs on cpu or cuda, not {device.type}"
    if kernel == "int4pack":
        if bits > 4:
            return f"int4pack holds at most 4-bit codes (this weight is {bits}-bit)"
        G, _ = group_layout(qw)
        if G is None:
            return "int4pack needs groups of equal size (this g_idx has unequal groups)"
        if _int4_group(G) is None:
            return f"int4pack needs a group size that is a multiple of 32, 64, 128 or 256 (this one is {G})"
        if device.type == "cpu":
            if dtype not in (torch.float32, torch.float16, torch.bfloat16):
                return f"int4pack on cpu takes fp32/fp16/bf16 activations, not {dtype}"
            if out_f % 16:
                return f"int4pack on cpu needs out_features divisible by 16 (this one is {out_f})"
        else:
            if dtype != torch.bfloat16:
                return f"int4pack on cuda takes bf16 activations only, not {dtype}"
            if out_f % 8:
                return f"int4pack on cuda needs out_features divisible by 8 (this one is {out_f})"
        return None
    if kernel == "int8pack":
        if qw.scale.shape[1] != 1:
            return "int8pack is per-channel only (this weight is grouped)"
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"int8pack takes fp32/fp16/bf16 activations, not {dtype}"
        return None
    raise one_of("kernel", kernel, KERNELS)


def _int8dyn_unsupported(qw: QuantizedWeight, device: torch.device, dtype: torch.dtype) -> str | None:
    """Where int8dyn would not compute exactly the fake-quant reference, why (None: it can run)."""
    if not qw.spec.quantizes_activations:
        return "int8dyn quantizes activations; this weight's format is weight-only (act_bits 16)"
    if qw.spec.static_activations:
        return "int8dyn quantizes activations per token (dynamic); this weight's format is per-tensor static (act_scheme tensor)"
    if device.type != "cpu":
        return f"int8dyn is verified on cpu only (torch._int_mm elsewhere has shape limits), not {device.type}"
    if qw.scale.shape[1] != 1:
        return ("int8dyn needs per-channel weight scales (this weight is grouped: one int32 accumulation "
                "cannot apply a scale per group)")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"int8dyn takes fp32/fp16/bf16 activations, not {dtype}"
    z = qw.zero[:, 0]
    if not bool((z == z.round()).all()):
        return "int8dyn needs integer zero points (this weight has fractional ones)"
    return None


# ---- bit-plane storage for the dequant kernel ---------------------------------------------------
def bit_planes(bits: int) -> list[tuple[int, int]]:
    """(width, shift) of each plane a `bits`-bit code is split into: widths are powers of two
    (3 = 2 + 1, 5 = 4 + 1, 6 = 4 + 2, 7 = 4 + 2 + 1), widest plane holding the lowest bits, so no
    code ever straddles a byte and every plane unpacks with whole-block byte operations."""
    out, shift = [], 0
    for w in (8, 4, 2, 1):
        if bits & w:
            out.append((w, shift))
            shift += w
    assert shift == bits, bits
    return out


def pack_planes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (rows, n) in [0, 2^bits) -> uint8 (rows, bits * B), B = ceil(n / 32) * 4: exactly `bits`
    bits a code (n padded to a multiple of 32).

    Layout, per row: the columns are cut into 8 blocks of B (block t = columns t*B .. t*B + B - 1). A
    plane of width w (bit_planes) takes w rows of B bytes; byte j of its row h holds, at bit offset
    tp * w, the plane's bits of column j of block t = h * (8 // w) + tp. So every byte lane of every
    plane maps to the same column j of some block, and unpacking is a few shift/mask operations on
    the bytes seen as int32 words (SWAR), each writing one whole block (`unpack_planes`)."""
    rows, n = q.shape
    B = -(-n // 32) * 4
    codes = F.pad(q.to(torch.int32), (0, 8 * B - n)).view(rows, 8, B)
    out = []
    for w, shift in bit_planes(bits):
        per = 8 // w
        pc = ((codes >> shift) & ((1 << w) - 1)).view(rows, w, per, B)
        byte = torch.zeros(rows, w, B, dtype=torch.int32, device=q.device)
        for tp in range(per):
            byte |= pc[:, :, tp] << (tp * w)
        out.append(byte)
    return torch.cat(out, dim=1).to(torch.uint8).reshape(rows, bits * B).contiguous()


_REP = {1: 0x01010101, 2: 0x03030303, 4: 0x0F0F0F0F}  # a w-bit mask in every byte of an int32


def unpack_planes(packed: torch.Tensor, bits: int, out: torch.Tensor | None = None,
                  tmp: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of pack_planes: uint8 codes (rows, 8 * B) in column order (the first n are the codes).
    `out` / `tmp`: optional int32 scratch of at least rows * 2 * B elements / rows * B elements."""
    rows, nb = packed.shape
    B = nb // bits
    if bits == 8:
        return packed
    B4 = B // 4
    src32 = packed.view(torch.int32).view(rows, bits, B4)
    c = (torch.empty(rows * 2 * B, dtype=torch.int32, device=packed.device) if out is None
         else out[: rows * 2 * B]).view(rows, 8, B4)
    row0 = 0
    for i, (w, shift) in enumerate(bit_planes(bits)):
        per = 8 // w
        src = src32[:, row0:row0 + w]
        cv = c.view(rows, w, per, B4)
        for tp in range(per):
            if i == 0:
                dst = cv[:, :, tp]
                torch.bitwise_right_shift(src, tp * w, out=dst)
                dst.bitwise_and_(_REP[w])
            else:
                tt = (torch.empty(rows * w * B4, dtype=torch.int32, device=packed.device) if tmp is None
                      else tmp[: rows * w * B4]).view(rows, w, B4)
                torch.bitwise_right_shift(src, tp * w, out=tt)
                tt.bitwise_and_(_REP[w]).bitwise_left_shift_(shift)
                cv[:, :, tp].bitwise_or_(tt)
        row0 += w
    return c.view(rows, 8 * B4).view(torch.uint8)


class _Workspace(threading.local):
    """Scratch buffers reused by every dequant forward of a thread: allocating (and page-faulting) a
    fresh dequantized weight on each call costs several times the arithmetic (docs/kernels.md)."""

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        # Buffers made under inference_mode cannot be written outside it (and vice versa): keep both.
        key = (name, dtype, str(device), torch.is_inference_mode_enabled())
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = self.buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]


_WS = _Workspace()
_OPS: dict = {}


def _op(name: str):
    """torch.ops.aten.<name>.default, looked up once (the attribute lookup costs microseconds a call)."""
    op = _OPS.get(name)
    if op is None:
        op = _OPS[name] = getattr(torch.ops.aten, name).default
    return op


_FLOAT_BUFFER = {"fake": "weight", "int4pack": "scales_and_zeros", "int8pack": "scales", "dequant": "scales",
                 "int8dyn": "scales"}
CHUNK_ELEMS = 1 << 19  # dequantize this many weights at a time (the fastest chunk size, docs/kernels.md)


# ---- the module --------------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """A linear layer computed from a QuantizedWeight with one of KERNELS (see the module docstring).

    Buffers are registered (so `.to(device)`, `state_dict` and `model_nbytes` see them); the compute
    dtype is the dtype the scales are held in, and inputs of another dtype are cast to it and back.
    The int4pack layout is device specific: build the module on the device it will run on."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None, kernel: str = "dequant",
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__()
        if kernel not in KERNELS:
            raise one_of("kernel", kernel, KERNELS)
        device = torch.device(device)
        why = kernel_unsupported(qw, kernel, device, dtype)
        if why is not None:
            raise BadInput(f"kernel {kernel!r} cannot run this layer: {why}; accepted: a kernel that supports it, or 'auto'")
        self.out_features, self.in_features = qw.qweight.shape
        self.bits, self.group_size, self.kernel = qw.spec.bits, qw.spec.group_size, kernel
        self.act_bits = qw.spec.act_bits  # < 16: inputs are quantized per token (int8dyn: for real)
        self.act_scale = _static_scale(qw)  # per-tensor static format: its calibrated scale (else None)
        self.layout = device.type
        self.note = ""  # why deploy fell back to this kernel, if it did
        self.register_buffer("perm", None)
        self.register_buffer("bias", None if bias is None else bias.detach().to(device=device, dtype=dtype).clone())
        getattr(self, f"_build_{kernel}")(qw, dtype, device)

    # -- construction -------------------------------------------------------------------------------
    def _permuted(self, qw: QuantizedWeight, device) -> tuple[torch.Tensor, int | None]:
        """Codes with contiguous groups (columns permuted when needed; `perm` is set) and G."""
        G, perm = group_layout(qw)
        q = qw.qweight
        if perm is not None:
            q = q[:, perm]
            self.perm = perm.to(device)
        return q, G

    def _build_fake(self, qw, dtype, device):
        self.register_buffer("weight", qw.dequantize().to(device=device, dtype=dtype))

    def _build_int4pack(self, qw, dtype, device):
        q, G = self._permuted(qw, device)
        g = _int4_group(G)
        self.kgroup = g
        # The kernels compute w = (q - 8) * scale + zero_f with a float zero, (K/g, N, 2) scales_and_zeros in
        # the activation dtype: (q - z) * s is exactly zero_f = (8 - z) * s, computed in fp32, then cast.
        # A group G coarser than g (a multiple of it) repeats its scales over the G // g sub-groups.
        # Codes of b < 4 bits are moved to the middle of the int4 range (q + c, z + c, same weight) so
        # that (q - 8) and the float zero stay small: in bf16 both are rounded, and a large offset that
        # cancels would cost precision.
        c = 8 - 2 ** (self.bits - 1)
        s = qw.scale.float().repeat_interleave(G // g, dim=1)
        zf = ((8.0 - (qw.zero.float() + c)) * qw.scale.float()).repeat_interleave(G // g, dim=1)
        self.register_buffer("scales_and_zeros", torch.stack([s.t(), zf.t()], dim=-1).to(dtype).contiguous().to(device))
        q = q.to(torch.int32) + c
        if device.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
        else:
            k = self.in_features
            inner = next(t for t in (8, 4, 2) if k % (t * 16) == 0)
            nibbles = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).to(device)
            packed = torch.ops.aten._convert_weight_to_int4pack(nibbles.contiguous(), inner)
        self.register_buffer("packed", packed)

    def _build_int8pack(self, qw, dtype, device):
        # x @ (q8 * s).T with q8 = q - o, o a per-row integer offset into int8; the remainder (o - z) * s
        # is added in forward as the rank-1 term x.sum(-1) (x) ((o - z) * s), skipped when it is 0.
        q = qw.qweight.to(torch.int32)
        z, s = qw.zero[:, 0].double(), qw.scale[:, 0].double()
        maxq = qw.spec.maxq
        o = torch.clamp(torch.round(z), maxq - 127, 128)  # q - o always fits in int8
        self.register_buffer("qweight", (q - o.to(torch.int32)[:, None]).to(torch.int8).to(device))
        self.register_buffer("scales", s.to(dtype).to(device))
        corr = (o - z) * s
        self.register_buffer("corr", None if bool((corr == 0).all()) else corr.float().to(device))

    def _build_int8dyn(self, qw, dtype, device):
        # y = s_n * xs_m * sum_k xq_mk (q_nk - z_n), the sum exact in int32: int8 codes q8 = q - o (o a per-row
        # integer offset that fits them in int8), plus (o - z) * rowsum(xq) when some o != z (asymmetric grids).
        q = qw.qweight.to(torch.int32)
        z = qw.zero[:, 0].round().to(torch.int32)
        o = torch.clamp(z, qw.spec.maxq - 127, 128)
        self.register_buffer("qweight", (q - o[:, None]).to(torch.int8).to(device))
        self.register_buffer("scales", qw.scale[:, 0].to(dtype).to(device))
        corr = o - z
        self.register_buffer("corr", None if bool((corr == 0).all()) else corr.to(device))

    def _build_dequant(self, qw, dtype, device):
        if group_layout(qw)[0] is not None:
            q, G = self._permuted(qw, device)
        else:  # unequal groups: scales are gathered per column on every forward
            q, G = qw.qweight, None
            self.register_buffer("g_idx", qw.g_idx.to(torch.long).to(device))
        self.G = G
        self.register_buffer("qplanes", pack_planes(q, self.bits).to(device))
        self.register_buffer("scales", qw.scale.to(dtype).to(device))
        z = qw.zero
        on_grid = bool(((z == z.round()) & (z >= 0) & (z <= 255)).all())
        self.register_buffer("zeros", (z.round().to(torch.uint8) if on_grid else z.to(dtype)).to(device))

    # -- forward ------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype: that of the float buffer the kernel reads (follows `model.to(dtype)`)."""
        return self.scales_like.dtype

    @property
    def scales_like(self) -> torch.Tensor:
        return self._buffers[_FLOAT_BUFFER[self.kernel]]

    def _dequant_rows(self, r0: int, r1: int, dtype) -> torch.Tensor:
        """Rows r0:r1 of the dequantized weight (columns in the stored order) in a scratch buffer."""
        k, bits = self.in_features, self.bits
        packed = self.qplanes[r0:r1]
        dev, r, B = packed.device, r1 - r0, self.qplanes.shape[1] // bits
        w = _WS.get("w", r * k, dtype, dev).view(r, k)
        c = unpack_planes(packed, bits, out=_WS.get("c32", r * 2 * B, torch.int32, dev),
                          tmp=_WS.get("t32", r * B, torch.int32, dev))[:, :k]
        w.copy_(c)
        z, s = self.zeros[r0:r1], self.scales[r0:r1]
        if self.G is None:  # unequal groups: per-column gathers
            return w.sub_(z[:, self.g_idx].to(dtype)).mul_(s[:, self.g_idx].to(dtype))
        # (q - z) * s exactly as QuantizedWeight.dequantize (also faster than a fused c*s - z*s addcmul)
        w.view(r, k // self.G, self.G).sub_(z.to(dtype)[:, :, None]).mul_(s.to(dtype)[:, :, None])
        return w

    def _dequant_mm(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 @ W_hat.T, dequantizing CHUNK_ELEMS weights at a time into reused scratch buffers."""
        n, k = self.out_features, self.in_features
        rows = max(1, CHUNK_ELEMS // k)
        yt = torch.empty(n, x2.shape[0], dtype=x2.dtype, device=x2.device)
        xt = x2.t()
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            torch.mm(self._dequant_rows(r0, r1, x2.dtype), xt, out=yt[r0:r1])
        return yt.t()

    def _int8dyn_mm(self, x2: torch.Tensor) -> torch.Tensor:
        """Per-token int8 codes of x2 (exactly quantize_activation's: the same scale, the same division and
        rounding; |x / scale| <= 2^(b-1) - 1, so no clamp is needed), an exact int32 product, then scaled."""
        xf = x2.float()
        xs = xf.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-5).div_(2 ** (self.act_bits - 1) - 1)
        xq = torch.div(xf, xs).round_().to(torch.int8)
        acc = torch._int_mm(xq, self.qweight.t())
        if self.corr is not None:
            acc.add_(torch.outer(xq.sum(-1, dtype=torch.int32), self.corr))
        # int32 -> fp32 first: a mixed int32 * fp32 multiply takes a slow unvectorized path (docs/kernels.md)
        return acc.float().mul_(xs).mul_(self.scales.float()).to(x2.dtype)

    def _mm(self, x2: torch.Tensor) -> torch.Tensor:
        """(M, K) in the compute dtype -> (M, N) without bias; a weight-activation layer's input quantized first."""
        if self.kernel == "int8dyn":
            return self._int8dyn_mm(x2)
        if self.act_scale is not None:  # a static format: simulated with its calibrated per-tensor scale
            x2 = quantize_activation_static(x2, self.act_scale, self.act_bits)
        elif self.act_bits < 16:  # no integer kernel for this layer: the activation quantizer is simulated
            x2 = quantize_activation(x2, self.act_bits)
        if self.kernel == "fake":
            return F.linear(x2, self.weight)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        if self.kernel == "int4pack":
            if x2.device.type != self.layout:
                raise RuntimeError(f"int4pack weights were packed for {self.layout}, input is on {x2.device.type}; "
                                   "deploy the model on the device it runs on")
            op = _op("_weight_int4pack_mm_for_cpu" if self.layout == "cpu" else "_weight_int4pack_mm")
            return op(x2.contiguous(), self.packed, self.kgroup, self.scales_and_zeros)
        if self.kernel == "int8pack":
            out = _op("_weight_int8pack_mm")(x2.contiguous(), self.qweight, self.scales)
            if self.corr is not None:  # + x.sum(-1) (x) (o - z) * s, in fp32, rounded once
                xs = x2.sum(-1, keepdim=True, dtype=torch.float32)
                out = torch.addmm(out.float(), xs, self.corr[None, :]).to(out.dtype)
            return out
        return self._dequant_mm(x2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        in_dtype, dtype = x2.dtype, self._buffers[_FLOAT_BUFFER[self.kernel]].dtype
        if in_dtype != dtype:
            x2 = x2.to(dtype)
        bias = self.bias
        if self.kernel == "fake" and self.act_bits >= 16:
            out = F.linear(x2, self.weight, bias)
        else:
            out = self._mm(x2) if x2.shape[0] else x2.new_zeros(0, self.out_features)
            if bias is not None:
                out = out.add_(bias)
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out if in_dtype == dtype else out.to(in_dtype)

    @property
    def label(self) -> str:
        """The kernel as result rows name it: a simulated activation quantizer shows as '+fakeA<bits>'."""
        if self.act_bits >= 16 or self.kernel == "int8dyn":
            return self.kernel
        return f"{self.kernel}+fakeA{self.act_bits}" + ("t" if self.act_scale is not None else "")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"act_bits={self.act_bits}, group_size={self.group_size}, kernel={self.label}, dtype={self.dtype}, "
                f"bias={self.bias is not None}{', act-order perm' if self.perm is not None else ''}")


def _static_scale(qw: QuantizedWeight) -> torch.Tensor | None:
    """A per-tensor static layer's calibrated input scale (the engine stores it in extras["act_scale"])."""
    if not qw.spec.static_activations:
        return None
    if "act_scale" not in qw.extras:
        raise BadInput("a per-tensor static weight-activation layer carries no calibrated act_scale; "
                       "accepted: the engine's output or a saved cell (which stores it)")
    return qw.extras["act_scale"].float()


# ---- choosing and deploying -------------------------------------------------------------------------
def auto_kernel(qw: QuantizedWeight, device: torch.device, dtype: torch.dtype, widen: bool = False) -> str:
    """The kernel `auto` uses for one layer (AUTO_RULE): the fastest measured kernel that keeps the
    weight at its own width and can run it; `widen=True` also allows 2/3-bit on int4pack and
    per-channel 2..7-bit on int8pack (faster, but stored at 4 / 8 bits)."""
    bits = qw.spec.bits
    device = torch.device(device)
    if qw.spec.quantizes_activations and kernel_unsupported(qw, "int8dyn", device, dtype) is None:
        # the integer computation itself; faster than the simulated quantizer in most measured cases and at
        # most ~2x slower on a layer, no slower on a whole model (docs/kernels.md)
        return "int8dyn"
    candidates = []
    if bits == 4 or (widen and bits < 4):
        candidates.append("int4pack")
    if bits == 8 or (widen and qw.scale.shape[1] == 1):
        candidates.append("int8pack")
    for k in candidates:
        if kernel_unsupported(qw, k, device, dtype) is None and _faster_than_dequant(k, device, dtype):
            return k
    return "dequant"


def _faster_than_dequant(kernel: str, device: torch.device, dtype: torch.dtype) -> bool:
    """AUTO_RULE's measured part: on CPU the aten int4/int8 kernels only pay off with bf16
    activations; with fp32 or fp16 activations they are 10-100x slower than dequant at prefill and
    no faster at decode (docs/kernels.md). On CUDA they are the standard fast path (not measured yet;
    `deploy(verify=True)` still checks their results)."""
    if device.type == "cpu":
        return dtype == torch.bfloat16
    return True


def verify_layer(layer: QuantLinear, qw: QuantizedWeight, rows: int = 3, seed: int = 0) -> float:
    """Relative Frobenius error of `layer` against x @ W_hat.T in fp32 on a fixed random input that is
    already rounded to the layer's dtype (so only the kernel's own rounding counts); for a
    weight-activation layer x is first fake-quantized (in fp32) as evaluation does."""
    dev = layer.scales_like.device
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, layer.in_features, generator=g).to(layer.dtype).to(dev)
    with torch.no_grad():
        got = layer._mm(x).float()
        xr = x.float()
        if layer.act_scale is not None:
            xr = quantize_activation_static(xr, layer.act_scale, qw.spec.act_bits)
        elif qw.spec.quantizes_activations:
            xr = quantize_activation(xr, qw.spec.act_bits)
        ref = xr @ qw.dequantize().to(dev).t()
    return float((got - ref).norm() / ref.norm().clamp(min=1e-30))


def _compute_dtype(model: nn.Module, dtype) -> torch.dtype:
    if dtype is not None:
        return dtype
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def deploy(model: nn.Module, quantized: dict[str, QuantizedWeight], kernel: str = "auto",
           dtype: torch.dtype | None = None, *, device: torch.device | str | None = None,
           verify: bool = True, widen: bool = False) -> dict[str, str]:
    """Replace each `nn.Linear` named in `quantized` (module names, as `EngineResult.quantized` keys
    them) by a QuantLinear, in place; returns name -> kernel used (its label: `QuantLinear.label`).

    `kernel`: one of CHOICES. A named kernel that cannot run a layer falls back to `dequant` for that
    layer (the reason is kept in `module.note`); a weight-activation layer keeps its activation quantizer
    there, simulated (labelled `dequant+fakeA<bits>`). `dtype`: compute dtype; when given the whole model is
    cast to it first (default: the model's dtype). `device`: where to run (default: where the model's
    parameters are); the model is moved there first, since the int4pack layout is device specific.
    `verify`: check every layer on a random input against the dequantized matmul (VERIFY_TOL) and fall
    back to `dequant` when a kernel errors or disagrees; an error of `dequant` itself is raised."""
    if kernel not in CHOICES:
        raise one_of("kernel", kernel, CHOICES)
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    dtype = _compute_dtype(model, dtype)
    used: dict[str, str] = {}
    for name, qw in quantized.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise BadInput(f"quantized weight {name!r} names no module of the model; accepted: module names of nn.Linear layers") from None
        if not isinstance(old, nn.Linear):
            raise BadInput(f"module {name!r} is a {type(old).__name__}, not an nn.Linear; accepted: nn.Linear layers")
        if tuple(old.weight.shape) != tuple(qw.qweight.shape):
            raise BadInput(f"quantized weight {name!r} has shape {tuple(qw.qweight.shape)} but the layer has {tuple(old.weight.shape)}")
        dev = old.weight.device
        want = auto_kernel(qw, dev, dtype, widen) if kernel == "auto" else kernel
        note = ""
        why = kernel_unsupported(qw, want, dev, dtype)
        if why is not None:
            note, want = f"{want}: {why}", "dequant"
        layer = None
        if verify and want != "dequant":
            tol = VERIFY_TOL.get(dtype, 3e-2)
            try:
                layer = QuantLinear(qw, old.bias, want, dtype, dev)
                err = verify_layer(layer, qw)
                if not err <= tol:
                    note, layer = f"{want}: relative error {err:.2e} > {tol:.0e} against the dequantized matmul", None
            except Exception as e:  # noqa: BLE001 -- a kernel missing on this build/device: fall back, noted
                note, layer = f"{want}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", None
            if layer is None:
                want = "dequant"
        if layer is None:
            layer = QuantLinear(qw, old.bias, want, dtype, dev)
        layer.note = note
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        used[name] = layer.label
    return used


def kernel_label(model: nn.Module) -> str:
    """What a model computes its linears with, for result rows: e.g. 'int4pack[bf16]', 'int8dyn[bf16]',
    'int4pack+fakeA8[bf16]' (a simulated activation quantizer), 'int4pack:24+dequant:4[fp32]' (counts,
    most used first), or 'dense[fp32]' without QuantLinears."""
    counts = Counter(m.label for m in model.modules() if isinstance(m, QuantLinear))
    dtype = _compute_dtype(model, None)
    dts = {m.dtype for m in model.modules() if isinstance(m, QuantLinear)} or {dtype}
    dname = "+".join(sorted(str(d).removeprefix("torch.").replace("float", "fp").replace("bfp16", "bf16") for d in dts))
    if not counts:
        return f"dense[{dname}]"
    if len(counts) == 1:
        return f"{next(iter(counts))}[{dname}]"
    return "+".join(f"{k}:{n}" for k, n in counts.most_common()) + f"[{dname}]"


def model_nbytes(model: nn.Module) -> int:
    """Bytes of the tensors the model holds: parameters and buffers (packed words, scales, zeros,
    permutations, unquantized weights, non-persistent buffers too), each tensor counted once (tied
    embeddings / lm_head count once). Dequant scratch buffers are inference memory, not counted."""
    seen: set[tuple] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.device.type, t.data_ptr(), t.dtype, t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
