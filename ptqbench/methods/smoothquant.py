"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights, then round.

Follows mit-han-lab/smoothquant `smooth_ln_fcs` (the baseline MBQ runs for W4A8/W8A8): per input channel j of
a norm-fed group of linears, s_j = max|X_j|^alpha / max|W_j|^(1-alpha), with max|X_j| over the block's
full-precision-stream inputs (valid tokens only: padding never counts), max|W_j| over the output rows of
every linear of the group (clamped >= 1e-5), and s clamped >= 1e-5. The norm's weight (and bias) is divided
by s and the linears' input columns multiplied by it, so the block computes the same function while its
activations are flatter. Two groups per decoder block, from its layout: attn_norm -> q, k, v and
mlp_norm -> gate, up (o and down take no smoothing, as in the reference for Llama-style blocks). The
smoothed weights are then quantized with RTN on the shared grid; the activation quantizer (per-token,
`QuantSpec.act_bits`) is the engine's and the evaluation's, not the method's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptqbench.methods.base import BlockView, Method, option, require_layout
from ptqbench.methods.quant import quantize_rtn
from ptqbench.methods.scale_search import capture_inputs, fold_scales


def input_absmax(xs: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
    """max_t |x_t| per input channel over the valid tokens of every batch (fp32)."""
    out = torch.zeros(xs[0].shape[-1], device=xs[0].device)
    for x, m in zip(xs, masks):
        if m.any():
            out = torch.maximum(out, x[m].float().abs().amax(dim=0))
    return out


def smoothing_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s = max|X|^alpha / max|W|^(1-alpha) per input channel (`smooth_ln_fcs`), both clamps included."""
    w_max = torch.stack([w.float().abs().amax(dim=0) for w in weights]).amax(dim=0).clamp(min=1e-5)
    return (act_max.float().pow(alpha) / w_max.to(act_max.device).pow(1 - alpha)).clamp(min=1e-5)


def smoothing_groups(block: BlockView) -> list[tuple[str, list[str]]]:
    """(norm, the linears it feeds) for the block's two norm-fed groups."""
    lay = require_layout(block.layout, "smoothquant")
    return [(lay.attn_norm, [lay.q, lay.k, lay.v]), (lay.mlp_norm, [lay.gate, lay.up])]


@torch.no_grad()
def smooth_block(block: BlockView, alpha: float) -> dict[str, torch.Tensor]:
    """Fold SmoothQuant's scales into the block (norm / s, linear columns * s); returns {norm: s}."""
    groups = smoothing_groups(block)
    xs = capture_inputs(block, [linears[0] for _, linears in groups], stream="fp")
    masks = [block.masks(b)["valid"] for b in range(block.n_batches)]
    out = {}
    for norm, linears in groups:
        s = smoothing_scales(input_absmax(xs[linears[0]], masks), [block.weight(n) for n in linears], alpha)
        fold_scales(block.block, norm, linears, s)
        out[norm] = s
    return out


@dataclass
class SmoothQuantOptions:
    alpha: float = option(0.5, "migration strength: s = max|X|^alpha / max|W|^(1-alpha) (0.5: SmoothQuant's and MBQ's)",
                          low=0.0, high=1.0)


class SmoothQuant(Method):
    name = "smoothquant"
    summary = "Per-channel smoothing folded into the norms (max|X|^a / max|W|^(1-a)), then RTN; for W8A8 / W4A8"
    Options = SmoothQuantOptions
    streams = "fp"
    supports_vision = False  # the smoothing groups need a decoder block layout

    def quantize_block(self, block: BlockView) -> None:
        smooth_block(block, self.opts.alpha)
        for name in block.linear_names:
            block.commit(name, quantize_rtn(block.weight(name), self.spec))
