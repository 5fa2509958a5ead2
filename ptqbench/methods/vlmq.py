"""VLMQ (Xue et al., arXiv 2508.03351): GPTAQ/GPTQ with token-importance-weighted statistics.

No public code exists; this follows the paper. Per decoder block, before anything is committed:
per-token importance g of each attention projection (q, k, v, o) from one block-local backward pass of
L = sum over valid tokens ||Attn(F) - Attn(U)||^2 (Attn(X) = X + attn(attn_norm(X)), F the FP-stream
input, U the quantized-stream one, FP weights), g_n = mean over output channels of |dL/dZ_n| at the
projection's output Z. A token's weight g (v1 reading, default) or g^2 (v2) multiplies it in both H and
GPTAQ's cross term; q, k, v and o get their own statistics, the MLP plain ones. A block whose factors
are all zero (F == U, e.g. block 0) falls back to uniform weights, i.e. the base solver. Design decisions
where the paper is silent, and the pilot-study importance sources: docs/methods.md.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from ptqbench.methods.base import BlockLayout, BlockView, Method, option, require_layout
from ptqbench.methods.gptaq import GPTAQOptions
from ptqbench.methods.gptq import Solve, input_stats


@dataclass
class VLMQOptions(GPTAQOptions):
    act_order: bool = option(True, "quantize columns in order of decreasing diag(H) (paper default: on)")
    factor: str = option("linear", "token weight from the importance g: 'linear' (v1: g) or 'squared' (v2: g^2)",
                         choices=("linear", "squared"))
    base: str = option("gptaq", "base solver: 'gptaq' (H + asymmetric cross term, both streams) or 'gptq' (weighted H only)",
                       choices=("gptaq", "gptq"))
    importance: str = option("gradient", "importance source: 'gradient' (block-local attention MSE), 'uniform', "
                             "'random_vision' (pilot study)", choices=("gradient", "uniform", "random_vision"))
    vision_drop: float = option(0.5, "random_vision: share of vision tokens down-weighted", low=0.0, high=1.0)
    vision_weight: float = option(0.5, "random_vision: weight of the down-weighted vision tokens (0 = drop them)", low=0.0)
    seed: int = option(0, "random_vision: seed of the token choice")
    normalize: bool = option(True, "divide each projection's factors by their mean over the block's valid tokens (a global scale cancels)")

    def solver_kwargs(self) -> dict:
        kw = super().solver_kwargs()
        if self.base != "gptaq":
            del kw["alpha"]  # the GPTQ base has no cross term
        return kw


def attention_projections(block: BlockView) -> dict[str, str]:
    """Short name (q_proj, ...) -> linear name inside the block, for the layout's q, k, v and o."""
    layout = require_layout(block.layout, "vlmq")
    out = {p.rsplit(".", 1)[-1]: p for p in layout.attention_projections}
    missing = [p for p in out.values() if p not in block.linear_names]
    if missing:
        raise RuntimeError(f"VLMQ needs the attention projections of the block layout; missing {missing}")
    return out


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        if not hasattr(root, p):
            root.add_module(p, nn.Module())
        root = getattr(root, p)
    root.add_module(leaf, module)


def _attention_subblock_fp32(fp_block: nn.Module, layout: BlockLayout) -> nn.Module:
    """The FP block itself when it is fp32, else an fp32 copy of only what Attn(X) uses."""
    if next(fp_block.parameters()).dtype == torch.float32:
        return fp_block
    holder = nn.Module()
    for path in (layout.attn_norm, layout.attn):
        _set_submodule(holder, path, copy.deepcopy(fp_block.get_submodule(path)).float())
    return holder.requires_grad_(False)


def gradient_importance(block: BlockView, proj: dict[str, str]) -> tuple[dict[str, list[torch.Tensor]], float]:
    """Per-token importance g (B, T) of each attention projection, per batch, and the loss L summed
    over batches. One backward pass per batch through the FP attention sub-block on the U path."""
    layout = block.layout
    sub = _attention_subblock_fp32(block.fp_block, layout)
    g: dict[str, list[torch.Tensor]] = {n: [] for n in proj.values()}
    total = 0.0
    for b in range(block.n_batches):
        valid = block.masks(b)["valid"]
        kw = block.kwargs(b, dtype=torch.float32)
        F = block.stream("fp", b).float()
        U = block.stream("quant", b).float()
        with torch.no_grad():
            target = layout.attention_residual(sub, F, kw)
        outs: dict[str, torch.Tensor] = {}
        hooks = [sub.get_submodule(n).register_forward_hook(lambda m, a, y, n=n: outs.__setitem__(n, y))
                 for n in proj.values()]
        try:
            with torch.enable_grad():
                u = U.detach().requires_grad_(True)
                y = layout.attention_residual(sub, u, kw)
                diff = (y - target)[valid]  # boolean selection: padded rows may hold anything
                loss = diff.pow(2).sum()
                names = list(proj.values())
                grads = torch.autograd.grad(loss, [outs[n] for n in names], allow_unused=True)
        finally:
            for h in hooks:
                h.remove()
        total += float(loss.detach())
        for n, p in zip(names, grads):
            gn = torch.zeros(valid.shape, device=valid.device) if p is None else p.detach().abs().float().mean(-1)
            g[n].append(torch.where(valid, gn, torch.zeros_like(gn)))
    return g, total


def random_vision_importance(block: BlockView, drop: float, weight: float, seed: int) -> list[torch.Tensor]:
    """Weight 1 on valid tokens, `weight` on a random share `drop` of the vision tokens (per batch)."""
    out = []
    for b in range(block.n_batches):
        m = block.masks(b)
        w = m["valid"].float().cpu()
        idx = (m["vision"] & m["valid"]).cpu().flatten().nonzero().flatten()
        k = int(round(drop * len(idx)))
        if k:
            gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + b)
            chosen = idx[torch.randperm(len(idx), generator=gen)[:k]]
            w.view(-1)[chosen] = weight
        out.append(w.to(block.device))
    return out


class VLMQ(Method):
    name = "vlmq"
    summary = "VLMQ: GPTAQ (or GPTQ) with per-token importance from a block-local attention-MSE gradient"
    Options = VLMQOptions
    streams = "both"
    supports_vision = False

    def __init__(self, spec, **options):
        super().__init__(spec, **options)
        self.blocks_info: list[dict] = []

    def on_start(self, run) -> None:
        self.blocks_info = []

    # ---- importance --------------------------------------------------------------------------
    def importance(self, block: BlockView) -> tuple[dict[str, list[torch.Tensor]], dict]:
        """name -> per-batch (B, T) token factors (before `factor`), and this block's diagnostics."""
        o = self.opts
        proj = attention_projections(block)
        valid = [block.masks(b)["valid"] for b in range(block.n_batches)]
        uniform = [v.float() for v in valid]
        info: dict = {"block": block.prefix, "importance": o.importance}
        if o.importance == "uniform":
            return {n: uniform for n in proj.values()}, dict(info, fallback=False, fallback_projections=[])
        if o.importance == "random_vision":
            w = random_vision_importance(block, o.vision_drop, o.vision_weight, o.seed)
            return {n: w for n in block.linear_names}, dict(info, fallback=False, fallback_projections=[])

        raw, loss = gradient_importance(block, proj)
        n_valid = sum(int(v.sum()) for v in valid)
        info["attn_mse_per_token"] = loss / max(n_valid, 1)
        factors, fallback, stats = {}, [], {}
        for role, n in proj.items():
            total = sum(float(g.sum()) for g in raw[n])
            if not (math.isfinite(total) and total > 0 and loss > 0):
                factors[n] = uniform
                fallback.append(role)
                continue
            mean = total / max(n_valid, 1)
            gs = [g / mean for g in raw[n]] if o.normalize else raw[n]
            factors[n] = gs
            stats[role] = {"raw_mean": mean, **self._modality_means(block, [g / mean for g in raw[n]])}
        info.update(fallback=bool(fallback), fallback_projections=fallback, g=stats)
        return factors, info

    @staticmethod
    def _modality_means(block: BlockView, gs: list[torch.Tensor]) -> dict:
        out = {}
        for t in ("vision", "text", "answer"):
            s, c = 0.0, 0
            for b, g in enumerate(gs):
                m = block.masks(b)
                sel = m[t] & m["valid"]
                s += float(g[sel].sum())
                c += int(sel.sum())
            out[f"mean_{t}"] = s / c if c else None
        if out["mean_vision"] is not None and out["mean_text"]:
            out["vision_over_text"] = out["mean_vision"] / out["mean_text"]
        return out

    # ---- quantization ------------------------------------------------------------------------
    def quantize_block(self, block: BlockView):
        o = self.opts
        factors, info = self.importance(block)  # before any commit: FP weights, one backward pass
        self.blocks_info.append(info)
        weights = {n: [g * g for g in gs] if o.factor == "squared" else gs for n, gs in factors.items()}
        stream = "both" if o.base == "gptaq" else "quant"
        for group in block.groups:
            weighted = [n for n in group if n in weights]
            plain = [n for n in group if n not in weights]
            stats = {}
            if weighted:
                stats.update(input_stats(block, weighted, stream=stream, weights=weights))
            if plain:
                stats.update(input_stats(block, plain, stream=stream))
            done = yield [Solve(block.weight(n), stats[n].H, self.spec, dXXT=stats[n].dXXT if o.base == "gptaq" else None,
                                **o.solver_kwargs()) for n in group]
            for name, qw in zip(group, done):
                block.commit(name, qw)

    def on_end(self, run) -> dict:
        fb = [i["block"] for i in self.blocks_info if i.get("fallback")]
        return {"importance": self.opts.importance, "factor": self.opts.factor, "base": self.opts.base,
                "fallback_blocks": fb, "blocks": self.blocks_info}
