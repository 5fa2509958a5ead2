"""GPTQ (Frantar et al., 2022), the column-wise solver it shares with GPTAQ and VLMQ, and the input
statistics (Hessian H, GPTAQ's cross term dXXT, optionally token-weighted) those three methods own.

`solve` follows IST-DASLab/gptq `GPTQ.fasterquant` (dead columns, relative damping, the chol ->
cholesky_inverse -> chol(upper) chain, lazy batch updates, act-order, static groups). Given a cross term
it also applies GPTAQ's asymmetric correction P = alpha * triu_1(dXXT R^T) R, subtracted with each column
*before* rounding, so GPTAQ and VLMQ are this loop with extra statistics. With dynamic groups a group's
grid comes from the weights as updated so far; see docs/methods.md for this and the other deviations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptqbench.methods.base import BlockView, CrossTerm, Hessian, Method, option
from ptqbench.methods.quant import QuantizedWeight, QuantSpec, fake_quant, grid_params


@torch.no_grad()
def solve(
    weight: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    dXXT: torch.Tensor | None = None,
    alpha: float = 0.25,
) -> QuantizedWeight:
    W = weight.detach().clone().float()
    rows, cols = W.shape
    g = spec.groups_for(cols)
    H = H.detach().clone().float()
    dXXT = None if dXXT is None else dXXT.detach().clone().float()

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if dXXT is not None:
        dXXT[:, dead] = 0

    n_groups = cols // g
    scale = torch.zeros(rows, n_groups, device=W.device)
    zero = torch.zeros(rows, n_groups, device=W.device)
    if static_groups:  # grids from the original (dead-zeroed) weights, before any update
        for k in range(n_groups):
            scale[:, k], zero[:, k] = grid_params(W[:, k * g:(k + 1) * g], spec)

    perm = torch.arange(cols, device=W.device)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        if dXXT is not None:
            dXXT = dXXT[perm][:, perm]
    # g_idx: which group each (original) column belongs to.
    g_idx = torch.empty(cols, dtype=torch.long, device=W.device)
    if static_groups or not act_order:
        g_idx[:] = torch.arange(cols, device=W.device) // g
    else:  # act-order with dynamic groups: groups follow the permuted order
        g_idx[perm] = torch.arange(cols, device=W.device) // g

    damp = percdamp * torch.mean(torch.diag(H))
    idx = torch.arange(cols, device=W.device)
    H[idx, idx] += damp
    R = torch.linalg.cholesky(H)
    R = torch.cholesky_inverse(R)
    R = torch.linalg.cholesky(R, upper=True)  # H^-1 = R^T R
    P = None
    if dXXT is not None:
        P = alpha * ((dXXT @ R.T).triu_(diagonal=1)) @ R

    Q = torch.zeros_like(W)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        R1 = R[i1:i2, i1:i2]
        P1 = None if P is None else P[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            gi = int(g_idx[perm[col]])
            if not static_groups and col % g == 0:
                # Up-to-date weights of the group: this block's updated columns, then later ones.
                cur = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g]
                scale[:, gi], zero[:, gi] = grid_params(cur, spec)
            w = W1[:, i].clone()
            d = R1[i, i]
            q = fake_quant(w[:, None], scale[:, gi], zero[:, gi], spec.maxq).flatten()
            Q1[:, i] = q
            err = (w - q) / d
            upd = err[:, None] @ R1[i, i:][None, :]
            if P1 is not None:
                upd = upd - w[:, None] @ P1[i, i:][None, :]
            W1[:, i:] -= upd
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        upd = Err1 @ R[i1:i2, i2:]
        if P is not None:
            upd = upd - W1 @ P[i1:i2, i2:]
        W[:, i2:] -= upd

    invperm = torch.argsort(perm)
    Q = Q[:, invperm]
    if not torch.isfinite(Q).all():
        raise FloatingPointError("GPTQ produced non-finite weights (Hessian ill-conditioned?)")
    return QuantizedWeight.from_dequantized(Q, scale, zero, g_idx, spec)


# ---- input statistics ---------------------------------------------------------------------------------
@dataclass
class InputStats:
    H: torch.Tensor  # 2/N * sum_t w_t x_t x_t^T  (fp32, over valid tokens)
    dXXT: torch.Tensor | None  # 2/N * sum_t w_t (x_fp - x_q)_t x_q,t^T  (GPTAQ's cross term)
    n_tokens: int


def shared_inputs(groups: list[list[str]], names: list[str]) -> dict[str, str]:
    """name -> representative: linears in one true-sequential group read the same input."""
    rep = {}
    for n in names:
        grp = next((g for g in groups if n in g), [n])
        rep[n] = next(m for m in grp if m in names)
    return rep


def input_stats(block: BlockView, names: list[str], stream: str = "quant",
                weights: dict[str, list[torch.Tensor]] | None = None) -> dict[str, InputStats]:
    """Masked fp32 Hessians H (and, for stream="both", GPTAQ's cross term) of the named linears.

    stream: "quant" (inputs on the quantized stream through the current, partly quantized block),
    "fp" (full-precision stream through the frozen FP block), or "both" (H from the quantized inputs,
    dXXT from the difference of the two). weights[name][batch] are per-token weights (B, T) (VLMQ's
    importance factors); they multiply each token in H and dXXT alike, and give every linear its own
    statistics (no sharing within a group).
    """
    if stream not in ("quant", "fp", "both"):
        raise ValueError(f"stream {stream!r}")
    rep = shared_inputs(block.groups, names) if weights is None else {n: n for n in names}
    keys = sorted(set(rep.values()), key=names.index)
    hessians = {k: Hessian() for k in keys}
    cross = {k: CrossTerm() for k in keys} if stream == "both" else None
    torch.backends.cuda.matmul.allow_tf32 = False
    for b in range(block.n_batches):
        valid = block.masks(b)["valid"]
        xq = block.linear_inputs(keys, b, "fp" if stream == "fp" else "quant")
        xf = block.linear_inputs(keys, b, "fp") if cross is not None else None
        for k in keys:
            w = weights[k][b] if weights is not None else None
            hessians[k].add_batch(xq[k], valid, w)
            if cross is not None:
                cross[k].add_batch(xq[k], xf[k], valid, w)
    out = {k: InputStats(hessians[k].value(), None if cross is None else cross[k].value(), hessians[k].n_tokens)
           for k in keys}
    return {n: out[rep[n]] for n in names}


# ---- the method -------------------------------------------------------------------------------------
@dataclass
class SolverOptions:
    """The options of `solve`, declared once for GPTQ, GPTAQ and VLMQ."""

    blocksize: int = option(128, "lazy-batch block size B (columns updated together)")
    percdamp: float = option(0.01, "damping as a fraction of mean(diag H)")
    act_order: bool = option(False, "quantize columns in order of decreasing diag(H) (a cross term dXXT is permuted alike)")
    static_groups: bool = option(False, "precompute group grids from the original weights")

    def solver_kwargs(self) -> dict:
        return dict(blocksize=self.blocksize, percdamp=self.percdamp, act_order=self.act_order,
                    static_groups=self.static_groups)


@dataclass
class GPTQOptions(SolverOptions):
    true_sequential: bool = option(True, "q,k,v -> o -> gate,up -> down, each on inputs from the partly quantized block")


class GPTQ(Method):
    name = "gptq"
    summary = "GPTQ: Hessian-based column-wise error compensation on quantized-stream inputs"
    Options = GPTQOptions
    streams = "quant"

    def quantize_block(self, block: BlockView) -> None:
        if not self.opts.true_sequential:  # every statistic from one pass before anything changes
            stats = input_stats(block, block.linear_names, stream="quant")
        for group in block.groups:
            if self.opts.true_sequential:
                stats = input_stats(block, group, stream="quant")
            for name in group:
                block.commit(name, solve(block.weight(name), stats[name].H, self.spec, **self.opts.solver_kwargs()))
