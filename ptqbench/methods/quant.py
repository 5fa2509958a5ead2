"""The one fake-quant grid every method shares.

A weight W (out x in) is quantized per output row and per group of `group_size` consecutive input
columns (or per row when group_size == -1). Two grid conventions exist in the reference code and both
live here so that every method uses the same arithmetic:

- "minmax" (llm-awq / MBQ `pseudo_quantize_tensor`): asymmetric s = max(max-min, 1e-5)/(2^b-1),
  z = clamp(-round(min/s), 0, 2^b-1); symmetric s = absmax/(2^(b-1)-1) on the signed range
  [-2^(b-1), 2^(b-1)-1] (stored here as unsigned codes with zero = 2^(b-1)).
- "gptq" (IST-DASLab/gptq `Quantizer`): the range is widened to include 0; symmetric uses
  s = 2*absmax/maxq with zero = (maxq+1)/2 on the unsigned grid.

Every quantized weight is described by integer codes q (out x in), scale and zero (out x n_groups) and
g_idx (in,), the column -> group map (act-order can make it non-contiguous):
    W_hat = (q - zero[:, g_idx]) * scale[:, g_idx]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ptqbench.errors import BadInput, one_of

GRIDS = ("minmax", "gptq")
ACT_BITS = (4, 5, 6, 7, 8, 16)  # 16: weights only, activations stay in the compute dtype
ACT_SCHEMES = ("token", "tensor")  # per-token dynamic (default) | per-tensor static (scales calibrated)


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 128  # -1 = one group per output row (per-channel)
    sym: bool = False
    grid: str = "minmax"
    act_bits: int = 16  # activation bits at every quantized linear's input; 16 = weights only
    act_scheme: str = "token"  # "token": per-token dynamic; "tensor": per-tensor static (ignored when act_bits 16)

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise one_of("bits", self.bits, range(2, 9))
        if not isinstance(self.group_size, int) or (self.group_size != -1 and self.group_size < 1):
            raise BadInput(f"group size {self.group_size!r} is not accepted; accepted: -1 (per-channel) or a positive integer")
        if self.grid not in GRIDS:
            raise one_of("grid", self.grid, GRIDS)
        if not isinstance(self.act_bits, int) or isinstance(self.act_bits, bool) or self.act_bits not in ACT_BITS:
            raise BadInput(f"act-bits {self.act_bits!r} is not accepted; accepted: 4..8, or 16 (weights only)")
        if self.act_scheme not in ACT_SCHEMES:
            raise one_of("act-scheme", self.act_scheme, ACT_SCHEMES)

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups_for(self, in_features: int) -> int:
        """Group size actually used for a layer of this width; raises if it does not divide it."""
        if self.group_size == -1:
            return in_features
        if in_features % self.group_size:
            raise BadInput(
                f"group size {self.group_size} does not divide a layer's input width {in_features}; "
                f"accepted: -1 or a divisor of every quantized layer's input width"
            )
        return self.group_size

    def check_widths(self, widths) -> None:
        """Raise (as `groups_for`) for the first input width the group size does not divide."""
        for w in widths:
            self.groups_for(w)

    @property
    def label(self) -> str:
        g = "ch" if self.group_size == -1 else f"g{self.group_size}"
        a = f"a{self.act_bits}{'t' if self.static_activations else ''}" if self.quantizes_activations else ""
        return f"w{self.bits}{g}{'s' if self.sym else ''}{a}"

    @property
    def quantizes_activations(self) -> bool:
        return self.act_bits < 16

    @property
    def static_activations(self) -> bool:
        """Per-tensor static activation scales (calibrated once, stored with the weights)."""
        return self.quantizes_activations and self.act_scheme == "tensor"


def grid_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for each row of `w` (rows x cols -> (rows,), (rows,)), from min/max over the cols."""
    w = w.float()
    maxq = spec.maxq
    if spec.grid == "minmax":
        if spec.sym:
            half = 2 ** (spec.bits - 1)
            scale = (w.abs().amax(dim=1) / (half - 1)).clamp(min=1e-5)
            zero = torch.full_like(scale, float(half))
        else:
            wmax, wmin = w.amax(dim=1), w.amin(dim=1)
            scale = ((wmax - wmin).clamp(min=1e-5)) / maxq
            zero = (-torch.round(wmin / scale)).clamp(0, maxq)
        return scale, zero
    # "gptq": the reference Quantizer.find_params (weight=True, perchannel=True, no mse)
    zeros = torch.zeros(w.shape[0], device=w.device)
    xmin = torch.minimum(w.amin(dim=1), zeros)
    xmax = torch.maximum(w.amax(dim=1), zeros)
    if spec.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(both_zero, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) / maxq
    if spec.sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes of w (rows x cols) given per-row scale/zero broadcastable to w."""
    if scale.dim() == 1:
        scale, zero = scale[:, None], zero[:, None]
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    if scale.dim() == 1:
        scale, zero = scale[:, None], zero[:, None]
    return scale * (q - zero)


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return dequantize(quantize_codes(w, scale, zero, maxq), scale, zero)


@dataclass
class QuantizedWeight:
    """A quantized linear weight: integer codes plus the grid that maps them back to floats."""

    qweight: torch.Tensor  # (out, in) integer codes, uint8
    scale: torch.Tensor  # (out, n_groups) float32
    zero: torch.Tensor  # (out, n_groups) float32 (integer valued)
    g_idx: torch.Tensor  # (in,) int32 column -> group
    spec: QuantSpec
    extras: dict = field(default_factory=dict)

    def dequantize(self) -> torch.Tensor:
        g = self.g_idx.long()
        return (self.qweight.float() - self.zero[:, g]) * self.scale[:, g]

    @staticmethod
    def from_dequantized(w_hat: torch.Tensor, scale, zero, g_idx, spec: QuantSpec) -> "QuantizedWeight":
        """Recover the integer codes of a weight that already lies on the grid (e.g. GPTQ's output)."""
        g = g_idx.long()
        q = torch.round(w_hat.float() / scale[:, g] + zero[:, g]).clamp(0, spec.maxq)
        return QuantizedWeight(q.to(torch.uint8), scale.float(), zero.float(), g_idx.int(), spec)


def quantize_rtn(w: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest on the shared grid, per row and per group of consecutive columns."""
    rows, cols = w.shape
    g = spec.groups_for(cols)
    wg = w.float().reshape(rows, cols // g, g)
    scale, zero = grid_params(wg.reshape(-1, g), spec)
    q = quantize_codes(wg.reshape(-1, g), scale, zero, spec.maxq).reshape(rows, cols)
    g_idx = torch.arange(cols, device=w.device) // g
    return QuantizedWeight(
        q.to(torch.uint8), scale.reshape(rows, -1), zero.reshape(rows, -1), g_idx.int(), spec
    )


def quantize_activation(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token dynamic symmetric fake quantization over the last (channel) dim: scale = max(absmax, 1e-5) /
    (2^(b-1)-1) per token (the absmax clamped before the division, as SmoothQuant and MBQ's WALinear do), codes
    clamped to [-2^(b-1), 2^(b-1)-1]. Computed in fp32 and returned in x's dtype."""
    q_max = 2 ** (bits - 1) - 1
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5) / q_max
    return (torch.clamp(torch.round(xf / scale), -q_max - 1, q_max) * scale).to(x.dtype)


class ActivationQuantizer:
    """A forward pre-hook that fake-quantizes a linear's input per token (`quantize_activation`)."""

    def __init__(self, bits: int):
        self.bits = bits

    def __call__(self, module, args):
        return (quantize_activation(args[0], self.bits),) + tuple(args[1:])


def install_activation_quantizers(modules, bits: int) -> list:
    """Hook the activation quantizer onto each linear of `modules`; returns the hook handles (remove() them)."""
    return [m.register_forward_pre_hook(ActivationQuantizer(bits)) for m in modules]


def static_act_scale(absmax: torch.Tensor | float, bits: int) -> torch.Tensor:
    """A per-tensor static scale from a calibrated input absmax: max(absmax, 1e-5) / (2^(b-1)-1), 0-d fp32."""
    return torch.as_tensor(absmax, dtype=torch.float32).clamp(min=1e-5) / (2 ** (bits - 1) - 1)


def quantize_activation_static(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-tensor static symmetric fake quantization with a calibrated scale: clamp(round(x/scale), -2^(b-1),
    2^(b-1)-1) * scale, in fp32, returned in x's dtype (values beyond the calibrated range saturate)."""
    q_max = 2 ** (bits - 1) - 1
    s = scale.to(x.device, torch.float32)
    return (torch.clamp(torch.round(x.float() / s), -q_max - 1, q_max) * s).to(x.dtype)


class StaticActivationQuantizer:
    """A forward pre-hook that fake-quantizes a linear's input with one calibrated per-tensor scale."""

    def __init__(self, scale: torch.Tensor, bits: int):
        self.scale, self.bits = scale.float(), bits

    def __call__(self, module, args):
        return (quantize_activation_static(args[0], self.scale, self.bits),) + tuple(args[1:])


def install_static_activation_quantizers(modules_and_scales, bits: int) -> list:
    """Hook a static quantizer onto each (linear, scale) pair; returns the hook handles (remove() them)."""
    return [m.register_forward_pre_hook(StaticActivationQuantizer(s, bits)) for m, s in modules_and_scales]


def install_format_quantizers(modules_and_weights, spec: QuantSpec) -> list:
    """The activation quantizer of a weight-activation format at each (linear, its QuantizedWeight): per-tensor
    static with the weight's calibrated extras["act_scale"], or per token; none for weights only."""
    pairs = list(modules_and_weights)
    if not spec.quantizes_activations:
        return []
    if spec.static_activations:
        missing = [i for i, (_, qw) in enumerate(pairs) if "act_scale" not in qw.extras]
        if missing:
            raise BadInput(f"{len(missing)} linear(s) of a per-tensor static format carry no calibrated act_scale; "
                           "accepted: weights from the engine or a saved static cell")
        return install_static_activation_quantizers([(m, qw.extras["act_scale"]) for m, qw in pairs], spec.act_bits)
    return install_activation_quantizers([m for m, _ in pairs], spec.act_bits)
