"""GPTQ (Frantar et al., 2022), the column-wise solver it shares with GPTAQ and VLMQ, and the input
statistics (Hessian H, GPTAQ's cross term dXXT, optionally token-weighted) those three methods own.

`solve_many` (and `solve`, one problem of it) follows IST-DASLab/gptq `GPTQ.fasterquant` (dead columns,
relative damping, the chol -> cholesky_inverse -> chol(upper) chain, lazy batch updates, act-order, static
groups). Given a cross term it also applies GPTAQ's asymmetric correction P = alpha * triu_1(dXXT R^T) R,
subtracted with each column *before* rounding, so GPTAQ and VLMQ are this loop with extra statistics. With
dynamic groups a group's grid comes from the weights as updated so far; see docs/methods.md for this and the
other deviations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptqbench.methods.base import BlockView, CrossTerm, Hessian, Method, Together, option
from ptqbench.methods.quant import QuantizedWeight, QuantSpec, grid_params


@dataclass(eq=False)
class Solve(Together):
    """One linear's GPTQ solve, as a method hands it to the engine (`Together`): the solves of several cells
    with the same column count and options (`key`) run as one column loop (`solve_many`), each getting what
    it gets alone. `solve(weight, H, spec, ...)` is the direct call."""

    weight: torch.Tensor
    H: torch.Tensor
    spec: QuantSpec
    blocksize: int = 128
    percdamp: float = 0.01
    act_order: bool = False
    static_groups: bool = False
    dXXT: torch.Tensor | None = None
    alpha: float = 0.25

    def key(self) -> tuple:
        s = self.spec  # bits, rows, damping, act-order and the cross term may differ within a batch
        return (self.weight.shape[1], str(self.weight.device), s.group_size, s.sym, s.grid, self.blocksize,
                self.static_groups)

    def nbytes(self) -> int:
        """Its inputs, and what its run adds for it: the set-up's fp32 copies (weights, H -> R, dXXT -> P) and the
        loop's stacked weights and result, about twice the inputs again."""
        return 3 * sum(t.numel() * 4 for t in (self.weight, self.H, self.dXXT) if t is not None)

    @classmethod
    def run_together(cls, items: list["Solve"]) -> list:
        return solve_many(items)


@torch.no_grad()
def solve(weight: torch.Tensor, H: torch.Tensor, spec: QuantSpec, **options) -> QuantizedWeight:
    (out,) = solve_many([Solve(weight, H, spec, **options)])
    if isinstance(out, BaseException):
        raise out
    return out


@dataclass
class _Problem:
    """A solve after its set-up: weights, Cholesky factor R (H^-1 = R^T R), GPTAQ's P, permutation, groups."""

    W: torch.Tensor
    R: torch.Tensor
    P: torch.Tensor | None
    perm: torch.Tensor
    g_idx: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g: int


def _setup(s: Solve) -> _Problem:
    W = s.weight.detach().clone().float()
    rows, cols = W.shape
    g = s.spec.groups_for(cols)
    H = s.H.detach().clone().float()
    dXXT = None if s.dXXT is None else s.dXXT.detach().clone().float()

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if dXXT is not None:
        dXXT[:, dead] = 0

    n_groups = cols // g
    scale = torch.zeros(rows, n_groups, device=W.device)
    zero = torch.zeros(rows, n_groups, device=W.device)
    if s.static_groups:  # grids from the original (dead-zeroed) weights, before any update
        for k in range(n_groups):
            scale[:, k], zero[:, k] = grid_params(W[:, k * g:(k + 1) * g], s.spec)

    perm = torch.arange(cols, device=W.device)
    if s.act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        if dXXT is not None:
            dXXT = dXXT[perm][:, perm]
    # g_idx: which group each (original) column belongs to.
    g_idx = torch.empty(cols, dtype=torch.long, device=W.device)
    if s.static_groups or not s.act_order:
        g_idx[:] = torch.arange(cols, device=W.device) // g
    else:  # act-order with dynamic groups: groups follow the permuted order
        g_idx[perm] = torch.arange(cols, device=W.device) // g

    damp = s.percdamp * torch.mean(torch.diag(H))
    idx = torch.arange(cols, device=W.device)
    H[idx, idx] += damp
    R = torch.linalg.cholesky(H)
    R = torch.cholesky_inverse(R)
    R = torch.linalg.cholesky(R, upper=True)  # H^-1 = R^T R
    P = None if dXXT is None else s.alpha * ((dXXT @ R.T).triu_(diagonal=1)) @ R
    return _Problem(W, R, P, perm, g_idx, scale, zero, g)


@torch.no_grad()
def solve_many(items: list[Solve]) -> list:
    """GPTQ's column loop for several problems of one `Solve.key` (the same columns and options) at once: the
    weights stacked along a leading axis (fewer rows padded, problems with a cross term first), so each column
    costs one set of elementwise kernel launches for all of them. Every step is elementwise on a problem's own
    rows (the rank-1 updates as broadcast products, exact as the K=1 matmuls they replace) or per problem on its
    real rows (set-up, the grids, the lazy block updates), so each problem gets, bit for bit, what it gets
    alone. Returns a QuantizedWeight per problem, or the exception its set-up or result raised."""
    out: list = [None] * len(items)
    probs = []
    for n, s in enumerate(items):
        try:
            probs.append((n, _setup(s)))
        except Exception as e:  # noqa: BLE001 - that problem fails, the others go on
            out[n] = e
    if not probs:
        return out
    probs.sort(key=lambda np_: np_[1].P is None)  # stable: those with GPTAQ's P first, so P applies to a prefix
    ps, specs = [p for _, p in probs], [items[n].spec for n, _ in probs]
    n_p = sum(p.P is not None for p in ps)
    blocksize, static_groups = items[probs[0][0]].blocksize, items[probs[0][0]].static_groups
    rows = [p.W.shape[0] for p in ps]
    cols, g, dev = ps[0].W.shape[1], ps[0].g, ps[0].W.device
    W = torch.zeros(len(ps), max(rows), cols, device=dev)  # (problems, rows, cols)
    scales = torch.ones(len(ps), max(rows), ps[0].scale.shape[1], device=dev)  # padding rows: scale 1, zero 0
    zeros = torch.zeros_like(scales)
    for k, (p, r) in enumerate(zip(ps, rows)):
        W[k, :r], scales[k, :r], zeros[k, :r] = p.W, p.scale, p.zero
    R = torch.stack([p.R for p in ps])
    P = torch.stack([p.P for p in ps[:n_p]]) if n_p else None
    maxq = torch.tensor([float(s.maxq) for s in specs], device=dev)[:, None]
    group_of = torch.stack([p.g_idx[p.perm] for p in ps])  # (problems, cols): the group of each (permuted) column
    shared_group = (group_of == group_of[:1]).all(dim=0).tolist()  # the same group in every problem (all but act-order with static groups)
    group_of, every = group_of.T.tolist(), torch.arange(len(ps), device=dev)
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, :, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        R1 = R[:, i1:i2, i1:i2]
        P1 = None if P is None else P[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            gis = group_of[col]
            if not static_groups and col % g == 0:
                # Up-to-date weights of the group: this block's updated columns, then later ones.
                for k, r in enumerate(rows):
                    cur = torch.cat([W1[k, :r, i:], W[k, :r, i2:]], dim=1)[:, :g]
                    scales[k, :r, gis[k]], zeros[k, :r, gis[k]] = grid_params(cur, specs[k])
            if shared_group[col]:
                scale, zero = scales[:, :, gis[0]], zeros[:, :, gis[0]]  # (problems, rows)
            else:
                at = torch.tensor(gis, device=dev)
                scale, zero = scales[every, :, at], zeros[every, :, at]
            w = W1[:, :, i]
            # quant.fake_quant's arithmetic, with each problem's own maxq (a tensor, which torch.clamp cannot mix with 0)
            q = scale * (torch.minimum(torch.clamp(torch.round(w / scale) + zero, min=0), maxq) - zero)
            Q1[:, :, i] = q
            err = (w - q) / R1[:, i, i][:, None]
            upd = err[:, :, None] * R1[:, None, i, i:]
            if P1 is not None:
                upd[:n_p] = upd[:n_p] - w[:n_p, :, None] * P1[:, None, i, i:]
            W1[:, :, i:] -= upd
            Err1[:, :, i] = err
        Q[:, :, i1:i2] = Q1
        for k, r in enumerate(rows):  # the lazy block update: one matmul per problem on its rows, as alone
            upd = Err1[k, :r] @ R[k, i1:i2, i2:]
            if k < n_p:
                upd = upd - W1[k, :r] @ P[k, i1:i2, i2:]
            W[k, :r, i2:] -= upd
    for k, ((n, p), r) in enumerate(zip(probs, rows)):
        Qk = Q[k, :r][:, torch.argsort(p.perm)]
        if not torch.isfinite(Qk).all():
            out[n] = FloatingPointError("GPTQ produced non-finite weights (Hessian ill-conditioned?)")
        else:
            out[n] = QuantizedWeight.from_dequantized(Qk, scales[k, :r], zeros[k, :r], p.g_idx, specs[k])
    return out


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

    def quantize_block(self, block: BlockView):
        if not self.opts.true_sequential:  # every statistic from one pass before anything changes
            stats = input_stats(block, block.linear_names, stream="quant")
        for group in block.groups:
            if self.opts.true_sequential:
                stats = input_stats(block, group, stream="quant")
            # the engine runs the solves, together with other cells' where it can (`Together`)
            done = yield [Solve(block.weight(n), stats[n].H, self.spec, **self.opts.solver_kwargs()) for n in group]
            for name, qw in zip(group, done):
                block.commit(name, qw)
