"""AWQ (Lin et al., 2024): activation-aware per-channel scaling, then a clipping search, then RTN.

Follows mit-han-lab/llm-awq (`auto_scale.py`, `auto_clip.py`, `pre_quant.py: run_awq`). The scale search
is shared with MBQ (`ptqbench.methods.scale_search`); here with the plain MSE over valid tokens. The clip
search (`auto_clip_layer`): per output row and group, max_val = absmax * (1 - i/20), i = 0..9, minimising
the squared per-group partial dot-product error over sampled tokens (every (N // clip_tokens)-th valid
one); q and k are not clipped. The clamped weights are then quantized with RTN on the shared grid.
In a weight-activation format the scale search quantizes the group's inputs too (see `scale_search`); the
clip search stays llm-awq's weight-only objective on the scaled FP inputs (why: docs/methods.md).
Deviations from the reference and how it was checked: docs/methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptqbench.methods.base import BlockView, option
from ptqbench.methods.quant import QuantizedWeight, QuantSpec, quantize_rtn
from ptqbench.methods.scale_search import (
    MSE_ALL,
    ScaleSearchMethod,
    TokenLoss,
    alpha_grid,
    block_groups,
    fake_quant_rows,
    group_inputs_needed,
    scaled_inputs,
    search_block_scales,
)


# ---- clip search ------------------------------------------------------------------------------------
@torch.no_grad()
def clip_search(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, n_grid: int = 20, max_shrink: float = 0.5,
                oc_chunk: int = 256) -> torch.Tensor:
    """llm-awq `auto_clip_layer`: best max_val (out, n_groups) for weight w (out, in) on tokens x (n, in)."""
    rows, cols = w.shape
    g = spec.groups_for(cols)
    ng = cols // g
    xg = x.float().reshape(-1, ng, g)
    wg = w.float().reshape(rows, ng, g)
    best_all = []
    for r0 in range(0, rows, oc_chunk):
        wc = wg[r0:r0 + oc_chunk]
        org_max = wc.abs().amax(dim=-1, keepdim=True)  # (c, ng, 1)
        org_out = torch.einsum("ngk,cgk->cng", xg, wc)
        best = org_max.clone()
        min_err = torch.full_like(org_max, float("inf"))
        for i_s in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i_s / n_grid)
            cur = torch.clamp(wc, -max_val, max_val)
            q = fake_quant_rows(cur.reshape(-1, g), spec).reshape(cur.shape)
            err = (torch.einsum("ngk,cgk->cng", xg, q) - org_out).pow(2).mean(dim=1)[..., None]  # (c, ng, 1)
            better = err < min_err
            min_err[better] = err[better]
            best[better] = max_val[better]
        best_all.append(best)
    return torch.cat(best_all, dim=0).squeeze(-1)


def clamp_groups(w: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """llm-awq `apply_clip`: clamp each (row, group) of w to [-max_val, max_val]."""
    rows, cols = w.shape
    g = spec.groups_for(cols)
    mv = max_val.float().reshape(rows, cols // g, 1).to(w.device)
    wg = w.float().reshape(rows, cols // g, g)
    return torch.maximum(torch.minimum(wg, mv), -mv).reshape(rows, cols)


def quantize_clipped(w: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """RTN on the shared grid of the clamped weights (grid from the clamped min/max)."""
    return quantize_rtn(clamp_groups(w, max_val, spec), spec)


def sample_tokens(xs: list[torch.Tensor], masks: list[torch.Tensor], n_tokens: int) -> torch.Tensor:
    """Valid tokens of every batch in order, then every (N // n_tokens)-th one (llm-awq's sampling)."""
    x = torch.cat([xb[m] for xb, m in zip(xs, masks)], dim=0)
    return x[:: max(1, x.shape[0] // n_tokens)]


# ---- the method -------------------------------------------------------------------------------------
@dataclass
class AWQOptions:
    n_grid: int = option(20, "scale search grid: alpha = i / n_grid for i < n_grid")
    alpha_max: float = option(1.0, "largest alpha tried (0 = only alpha 0, i.e. no scaling)")
    clip: bool = option(True, "run AWQ's weight clipping search (q/k excluded)")
    clip_tokens: int = option(512, "tokens sampled for the clipping search")


class AWQ(ScaleSearchMethod):
    name = "awq"
    summary = "AWQ: activation-aware channel scaling (alpha grid search) + clipping search, then RTN"
    Options = AWQOptions
    streams = "fp"

    def __init__(self, spec: QuantSpec, **options):
        super().__init__(spec, **options)
        self.info: dict = {"alpha": {}, "clip_ratio": {}}

    def loss_for(self, group: dict) -> TokenLoss:
        return MSE_ALL

    def quantize_block(self, block: BlockView) -> None:
        alphas = alpha_grid(self.opts.n_grid, self.opts.alpha_max)
        results, inputs = search_block_scales(block, self.spec, alphas, self.loss_for)
        self.fold(block, results)
        self.info["alpha"][str(block.index)] = {r.prev_name: r.alpha for r in results}
        rep = group_inputs_needed(block_groups(block, self.name), block.linear_names)
        not_clipped = (block.layout.q, block.layout.k)
        masks = [block.masks(b)["valid"] for b in range(block.n_batches)]
        ratios = {}
        for name in block.linear_names:
            w = block.weight(name)
            if self.opts.clip and name not in not_clipped:
                x = sample_tokens(scaled_inputs(results, inputs, rep, name), masks, self.opts.clip_tokens)
                max_val = clip_search(w, x, self.spec)
                qw = quantize_clipped(w, max_val, self.spec)
                g = self.spec.groups_for(w.shape[1])
                absmax = w.float().reshape(w.shape[0], -1, g).abs().amax(-1)
                ratios[name] = float((max_val / absmax.clamp(min=1e-12)).mean())
            else:
                qw = quantize_rtn(w, self.spec)
            block.commit(name, qw)
        if ratios:
            self.info["clip_ratio"][str(block.index)] = ratios

    def on_end(self, run) -> dict:
        return self.info
