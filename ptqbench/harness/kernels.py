"""Deployment kernels: run a quantized linear from its integer codes, so latency and size are measured.

`deploy(model, quantized)` replaces each named `nn.Linear` by a `QuantLinear` built from its
`QuantizedWeight` (codes q, scale s, zero z, g_idx; W_hat = (q - z[:, g_idx]) * s[:, g_idx]) and
returns name -> kernel used. Kernels (all need only torch; torchao / hqq / quanto / gptqmodel are not
used):

- ``int4pack``: the aten "tinygemm" int4 kernels. CPU: ``aten._convert_weight_to_int4pack_for_cpu``
  (int32 (N, K) codes -> uint8 (N, K/2)) + ``aten._weight_int4pack_mm_for_cpu(x, packed, g,
  scales_and_zeros)``; CUDA: ``aten._convert_weight_to_int4pack`` (uint8 (N, K/2) nibble pairs,
  innerKTiles 8/4/2) + ``aten._weight_int4pack_mm``. ``scales_and_zeros`` is (K/g, N, 2) in the
  activation dtype and the kernels compute w = (q - 8) * scale + zero_f with a *float* zero, so our
  (q - z) * s is converted exactly as zero_f = (8 - z) * s (computed in fp32, then cast). The ops take
  g in {32, 64, 128, 256} only; a coarser group (or per-channel) whose size is a multiple of one of
  them is run with the scales repeated over sub-groups (same weight, a few more scale bytes). Groups
  must be contiguous: an act-order g_idx whose groups all have the same size is handled by permuting
  the weight columns once at load and gathering the input columns (x[:, perm]) on every forward;
  other g_idx fall back to ``dequant``. CPU: x may be fp32, fp16 or bf16 (scales in the same dtype);
  N must be a multiple of 16. CUDA: bf16 only, N a multiple of 8 (the CUDA branch could not be run in
  this session: no GPU; `deploy(verify=True)` checks every layer against the dequantized matmul and
  falls back to ``dequant`` on any error or mismatch, so a wrong convention cannot go unnoticed).
  Codes of fewer than 4 bits are valid int4 codes, so ``kernel="int4pack"`` also runs 2/3-bit
  weights, stored at 4 bits (``auto`` does this only with ``widen=True``).
- ``int8pack``: ``aten._weight_int8pack_mm(x, int8 (N, K), scales (N,))`` = x @ (q8 * s).T, per-channel
  only (one group per row; grouped weights fall back to ``dequant``). Our codes are shifted by a
  per-row integer offset o (128 for 8-bit) into int8, q8 = q - o, and the remainder (o - z) * s is
  added exactly as a rank-1 term x.sum(-1) (x) ((o - z) * s) -- skipped when z == o everywhere (the
  symmetric grids). Any bits <= 8 fit (``auto`` uses it only for 8-bit unless ``widen=True``).
- ``dequant``: holds the packed int32 words of `packing.pack_bits` (dense bit stream per row, b bits
  per code) plus scales (activation dtype) and zeros (uint8 when on-grid integers), and on every
  forward unpacks, dequantizes to the activation dtype and calls F.linear. Works for any bits, group
  size and g_idx; it is what 2/3-bit (and grouped 8-bit) really cost without a low-bit kernel.
- ``fake``: the full-precision dequantized weight as a dense parameter (the accuracy path; no
  memory saving).

`auto` chooses per layer, among the kernels that keep the weight at its quantized width (so a
layer never silently grows, and `model_nbytes` stays the method's): see AUTO_RULE below and the
measurements behind it.

Measurements (CPU, this machine: 2 shared cores with a training job and other tests running, so
numbers are medians of repeated timings; torch 2.14.1; per-layer forward, ms; g = group size)
-- filled in from /tmp/scratch_kernels/bench_rule.py, see MEASUREMENTS below.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from ptqbench.errors import BadInput, one_of
from ptqbench.harness.packing import pack_bits
from ptqbench.methods.quant import QuantizedWeight

KERNELS = ("int4pack", "int8pack", "dequant", "fake")
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
    out_f, in_f = qw.qweight.shape
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
    out_f, in_f = qw.qweight.shape
    if kernel in ("dequant", "fake"):
        return None
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


# ---- unpacking for the dequant kernel -------------------------------------------------------------
def _unpack_plan(bits: int, device) -> dict[str, torch.Tensor]:
    """Index/shift tables to read the 32 codes of a block of `bits` int32 words (see packing.py)."""
    start = torch.arange(32) * bits
    wi, off = start // 32, start % 32
    nlo = torch.clamp(32 - off, max=bits)
    return dict(
        wi=wi.to(device), wi1=torch.clamp(wi + 1, max=bits - 1).to(device),
        off=off.to(torch.int32).to(device), lomask=((1 << nlo) - 1).to(torch.int32).to(device),
        himask=((1 << (bits - nlo)) - 1).to(torch.int32).to(device), hshift=nlo.to(torch.int32).to(device),
    )


def unpack_codes(words: torch.Tensor, bits: int, n: int, plan: dict | None = None) -> torch.Tensor:
    """Codes (rows, n) from the dense bit stream of `packing.pack_bits` (rows, >= ceil(n*bits/32) int32
    words), vectorized. Bit widths dividing 8 read bytes (little-endian: code j of a byte sits at bits
    [j*b, (j+1)*b)); the others read blocks of `bits` words holding 32 codes each (`words` must then
    be padded to a multiple of `bits` words, as QuantLinear stores them). Returns uint8 or int32."""
    rows = words.shape[0]
    if 8 % bits == 0:
        by = words.view(torch.uint8)  # little-endian bytes of the stream
        if bits == 8:
            return by[:, :n]
        per = 8 // bits
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=words.device)
        c = (by.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return c.reshape(rows, -1)[:, :n]
    if plan is None:
        plan = _unpack_plan(bits, words.device)
    blocks = words.view(rows, -1, bits)
    lo = blocks.index_select(2, plan["wi"])
    hi = blocks.index_select(2, plan["wi1"])
    c = ((lo >> plan["off"]) & plan["lomask"]) | ((hi & plan["himask"]) << plan["hshift"])
    return c.reshape(rows, -1)[:, :n]


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
        self.layout = device.type
        self.note = ""  # why deploy fell back to this kernel, if it did
        self.perm: torch.Tensor | None
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
        s = qw.scale.float().repeat_interleave(G // g, dim=1)
        zf = ((8.0 - qw.zero.float()) * qw.scale.float()).repeat_interleave(G // g, dim=1)
        self.register_buffer("scales_and_zeros", torch.stack([s.t(), zf.t()], dim=-1).to(dtype).contiguous().to(device))
        q = q.to(torch.int32)
        if device.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
        else:
            k = self.in_features
            inner = next(t for t in (8, 4, 2) if k % (t * 16) == 0)
            nibbles = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).to(device)
            packed = torch.ops.aten._convert_weight_to_int4pack(nibbles.contiguous(), inner)
        self.register_buffer("packed", packed)

    def _build_int8pack(self, qw, dtype, device):
        q = qw.qweight.to(torch.int32)
        z, s = qw.zero[:, 0].double(), qw.scale[:, 0].double()
        maxq = qw.spec.maxq
        o = torch.clamp(torch.round(z), maxq - 127, 128)  # q - o always fits in int8
        self.register_buffer("qweight", (q - o.to(torch.int32)[:, None]).to(torch.int8).to(device))
        self.register_buffer("scales", s.to(dtype).to(device))
        corr = (o - z) * s
        self.register_buffer("corr", None if bool((corr == 0).all()) else corr.float().to(device))

    def _build_dequant(self, qw, dtype, device):
        G, perm = group_layout(qw)
        if G is not None:
            q, G = self._permuted(qw, device)
        else:  # unequal groups: scales are gathered per column on every forward
            q = qw.qweight
            self.register_buffer("g_idx", qw.g_idx.to(torch.long).to(device))
        self.G = G
        bits = self.bits
        words = pack_bits(q, bits)
        if 8 % bits:  # blocks of `bits` words (32 codes each) for the vectorized reader
            nw = -(-self.in_features // 32) * bits
            words = F.pad(words, (0, nw - words.shape[1]))
        self.register_buffer("qwords", words.contiguous().to(device))
        self.register_buffer("scales", qw.scale.to(dtype).to(device))
        z = qw.zero
        on_grid = bool(((z == z.round()) & (z >= 0) & (z <= 255)).all())
        self.register_buffer("zeros", (z.round().to(torch.uint8) if on_grid else z.to(dtype)).to(device))
        self._plan = None if 8 % bits == 0 else _unpack_plan(bits, device)

    # -- forward ------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        for name in ("weight", "scales_and_zeros", "scales"):
            t = getattr(self, name, None)
            if t is not None:
                return t.dtype
        raise AssertionError("QuantLinear without a float buffer")

    @property
    def scales_like(self) -> torch.Tensor:
        return getattr(self, "weight", None) if self.kernel == "fake" else (
            self.scales_and_zeros if self.kernel == "int4pack" else self.scales)

    def _dequant_weight(self, dtype) -> torch.Tensor:
        c = unpack_codes(self.qwords, self.bits, self.in_features, self._plan)
        n, k = self.out_features, self.in_features
        z, s = self.zeros.to(dtype), self.scales.to(dtype)
        if self.G is None:
            return (c.to(dtype) - z[:, self.g_idx]) * s[:, self.g_idx]
        ng = k // self.G
        return ((c.to(dtype).view(n, ng, self.G) - z[:, :, None]) * s[:, :, None]).view(n, k)

    def _mm(self, x2: torch.Tensor) -> torch.Tensor:
        """(M, K) in the compute dtype -> (M, N) without bias."""
        if self.kernel == "fake":
            return F.linear(x2, self.weight)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        if self.kernel == "int4pack":
            if x2.device.type != self.layout:
                raise RuntimeError(f"int4pack weights were packed for {self.layout}, input is on {x2.device.type}; "
                                   "deploy the model on the device it runs on")
            op = torch.ops.aten._weight_int4pack_mm_for_cpu if self.layout == "cpu" else torch.ops.aten._weight_int4pack_mm
            return op(x2.contiguous(), self.packed, self.kgroup, self.scales_and_zeros)
        if self.kernel == "int8pack":
            out = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.qweight, self.scales)
            if self.corr is not None:
                out = (out.float() + x2.float().sum(-1, keepdim=True) * self.corr).to(out.dtype)
            return out
        return F.linear(x2, self._dequant_weight(x2.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype
        in_dtype = x.dtype
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(dtype)
        if x2.shape[0] == 0:
            out = x2.new_zeros(0, self.out_features)
        else:
            out = self._mm(x2)
        if self.bias is not None:
            out = out + self.bias.to(dtype)
        return out.reshape(*lead, self.out_features).to(in_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, kernel={self.kernel}, dtype={self.dtype}, "
                f"bias={self.bias is not None}{', act-order perm' if self.perm is not None else ''}")


# ---- choosing and deploying -------------------------------------------------------------------------
def auto_kernel(qw: QuantizedWeight, device: torch.device, dtype: torch.dtype, widen: bool = False) -> str:
    """The kernel `auto` uses for one layer (AUTO_RULE): the fastest measured kernel that keeps the
    weight at its own width and can run it; `widen=True` also allows 2/3-bit on int4pack and
    per-channel 2..7-bit on int8pack (faster, but stored at 4 / 8 bits)."""
    bits = qw.spec.bits
    device = torch.device(device)
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
    return True


def verify_layer(layer: QuantLinear, qw: QuantizedWeight, rows: int = 3, seed: int = 0) -> float:
    """Relative Frobenius error of `layer` against x @ W_hat.T in fp32 on a fixed random input that is
    already rounded to the layer's dtype (so only the kernel's own rounding counts)."""
    dev = layer.scales_like.device
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, layer.in_features, generator=g).to(layer.dtype).to(dev)
    with torch.no_grad():
        got = layer._mm(x).float()
        ref = x.float() @ qw.dequantize().to(dev).t()
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
    them) by a QuantLinear, in place; returns name -> kernel used.

    `kernel`: one of CHOICES. A named kernel that cannot run a layer falls back to `dequant` for that
    layer (the reason is kept in `module.note`). `dtype`: compute dtype; when given the whole model is
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
            except Exception as e:  # a kernel missing on this build/device: fall back, loudly in .note
                note, layer = f"{want}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", None
            if layer is None:
                want = "dequant"
        if layer is None:
            layer = QuantLinear(qw, old.bias, want, dtype, dev)
        layer.note = note
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        used[name] = want
    return used


def kernel_label(model: nn.Module) -> str:
    """What a model computes its linears with, for result rows: e.g. 'int4pack[bf16]',
    'int4pack:24+dequant:4[fp32]' (counts, most used first), or 'dense[fp32]' without QuantLinears."""
    counts = Counter(m.kernel for m in model.modules() if isinstance(m, QuantLinear))
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
    permutations, unquantized weights, non-persistent buffers too), each storage counted once (tied
    embeddings / lm_head count once)."""
    seen: set[tuple] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.device.type, t.data_ptr(), t.dtype, t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
