"""VLMQ (Xue et al., arXiv 2508.03351): GPTAQ/GPTQ with token-importance-weighted statistics.

No public code exists; this follows `/work/shared/reference/methods.md` section 6 and checklist items
7-9. Per decoder block:

1. **Importance factors, once per block, from one block-local backward pass** with the block's
   *full-precision* weights (the engine's frozen `fp_block`, before anything of the block is committed):

       L = sum over valid tokens || Attn(F) - Attn(U) ||^2,     Attn(X) = X + self_attn(input_layernorm(X))

   F is the FP-stream input, U the quantized-stream input; Attn(F) is a constant target. P = dL/dZ is
   taken at the outputs Z of q_proj, k_proj, v_proj and o_proj on the U path, and each projection gets
   its own per-token factor g_n = mean over output channels of |P[n, :]| (K/V width is n_kv*head_dim
   under GQA). Padding tokens get g = 0 (they are also excluded from L). The factors are *not*
   recomputed after q/k/v are quantized (the paper gets them from one backward pass per block).
   The pass runs in fp32 (an fp32 copy of the attention sub-block when the model is fp16/bf16).

2. **Weighted statistics**: a token's weight is g (option factor="linear", the v1 reading of the
   paper, Hhat = X G X^T; default) or g^2 (factor="squared", the v2 reading ||(W_hat U - W F) G||^2).
   The weight multiplies the token in *both* H and GPTAQ's cross term dXXT (`input_stats(weight_fn=)`),
   i.e. X~ and dX are weighted consistently. q, k and v get separate weighted statistics (no sharing);
   o_proj is weighted by its own g; the MLP (gate/up/down) uses plain unweighted statistics.

3. **Solver**: base="gptaq" (default): H from quantized-path inputs, dXXT from the FP-path difference,
   P = alpha*triu(dXXT R^T) R with alpha = 0.25; base="gptq": weighted H on the quantized stream only,
   no cross term (the paper uses a GPTQ base for some INT2 runs; label such results). Paper defaults:
   act_order=True (so VLMQ's default differs from GPTQ/GPTAQ here), static_groups=False, percdamp 0.01.

Decisions where the paper is silent (methods.md [INFER]):
- **F == U** (block 0 when the vision tower is not quantized) gives L = 0 and zero gradients. Such a
  block -- or any projection whose factors are all zero or non-finite -- falls back to uniform weights
  (all valid tokens weight 1, which is exactly the base solver), and the fallback is recorded.
- **Normalisation** (option normalize, default on): each projection's factors are divided by their mean
  over the block's valid tokens before being used. A global scale of G cancels in GPTQ/GPTAQ (damping
  is relative and P = alpha*triu(dXXT R^T) R is scale-free), so this is numerical hygiene only (tiny
  gradients squared could underflow in fp32); it is a single scale per projection and block, never per
  sample (per-sample normalisation would change the objective).
- **Pilot-study importance sources**: importance="uniform" gives every valid token weight 1 (equals the
  base solver bit for bit); importance="random_vision" down-weights a random share `vision_drop` (0.5)
  of the vision tokens by the factor `vision_weight` and keeps every other valid token at 1. The paper
  reports "randomly down-weighting 50% of vision tokens" without the factor; we default to 0.5
  ("down-weighting", not dropping; vision_weight=0 drops them). The choice of tokens depends on
  (seed, batch) only, so the same tokens are down-weighted in every block, and since this is a
  calibration-data reweighting (not a gradient signal) it applies to every linear of the block,
  MLP included. Under factor="squared" the weight is squared like any factor.

Diagnostics (`on_end`): per block, the attention-MSE L per valid token, whether the uniform fallback
was used (and for which projections), and per projection the mean normalised factor over vision, text
and answer tokens (the overall valid-token mean is 1) plus the raw mean.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from ptqbench.errors import BadInput
from ptqbench.models.adapters import move
from ptqbench.methods.base import Method, option
from ptqbench.methods.gptq import solve
from ptqbench.methods.registry import register

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class VLMQOptions:
    factor: str = option("linear", "token weight from the importance g: 'linear' (v1: g) or 'squared' (v2: g^2)",
                         choices=("linear", "squared"))
    base: str = option("gptaq", "base solver: 'gptaq' (H + asymmetric cross term, both streams) or 'gptq' (weighted H only)",
                       choices=("gptaq", "gptq"))
    importance: str = option("gradient", "importance source: 'gradient' (block-local attention MSE), 'uniform', "
                             "'random_vision' (pilot study)", choices=("gradient", "uniform", "random_vision"))
    vision_drop: float = option(0.5, "random_vision: share of vision tokens down-weighted")
    vision_weight: float = option(0.5, "random_vision: weight of the down-weighted vision tokens (0 = drop them)")
    seed: int = option(0, "random_vision: seed of the token choice")
    normalize: bool = option(True, "divide each projection's factors by their mean over the block's valid tokens (a global scale cancels)")
    alpha: float = option(0.25, "GPTAQ correction scale (base='gptaq')")
    blocksize: int = option(128, "lazy-batch block size B (columns updated together)")
    percdamp: float = option(0.01, "damping as a fraction of mean(diag H)")
    act_order: bool = option(True, "quantize columns in order of decreasing diag(H) (paper default: on)")
    static_groups: bool = option(False, "precompute group grids from the original weights")


def _attn_projections(names: list[str]) -> dict[str, str]:
    """role (q_proj, ...) -> linear name inside the block."""
    out = {}
    for n in names:
        role = n.rsplit(".", 1)[-1]
        if role in ATTN_PROJ:
            out[role] = n
    missing = [r for r in ATTN_PROJ if r not in out]
    if missing:
        raise RuntimeError(f"VLMQ needs a Llama-style attention block with {', '.join(ATTN_PROJ)}; missing {missing}")
    return out


def _attention_subblock_fp32(fp_block: nn.Module) -> nn.Module:
    """The FP block itself when it is fp32, else an fp32 copy of only what Attn(X) uses."""
    if next(fp_block.parameters()).dtype == torch.float32:
        return fp_block
    holder = nn.Module()
    holder.input_layernorm = copy.deepcopy(fp_block.input_layernorm).float()
    holder.self_attn = copy.deepcopy(fp_block.self_attn).float()
    return holder.requires_grad_(False)


def gradient_importance(block, proj: dict[str, str]) -> tuple[dict[str, list[torch.Tensor]], float]:
    """Per-token importance g (B, T) of each attention projection, per batch, and the loss L summed
    over batches. One backward pass per batch through the FP attention sub-block on the U path."""
    sub = _attention_subblock_fp32(block.fp_block)
    g: dict[str, list[torch.Tensor]] = {n: [] for n in proj.values()}
    total = 0.0
    for b in range(block.n_batches):
        valid = block.masks(b)["valid"]
        kw = move(block.kwargs(b), block.device, torch.float32)
        F = block.stream("fp", b).float()
        U = block.stream("quant", b).float()
        with torch.no_grad():
            target = block.adapter.attention_residual(sub, F, kw)
        outs: dict[str, torch.Tensor] = {}
        hooks = [sub.get_submodule(n).register_forward_hook(lambda m, a, y, n=n: outs.__setitem__(n, y))
                 for n in proj.values()]
        try:
            with torch.enable_grad():
                u = U.detach().requires_grad_(True)
                y = block.adapter.attention_residual(sub, u, kw)
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


def random_vision_importance(block, drop: float, weight: float, seed: int) -> list[torch.Tensor]:
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


@register
class VLMQ(Method):
    name = "vlmq"
    summary = "VLMQ: GPTAQ (or GPTQ) with per-token importance from a block-local attention-MSE gradient"
    Options = VLMQOptions
    streams = "both"
    supports_vision = False

    def __init__(self, spec, **options):
        super().__init__(spec, **options)
        o = self.opts
        if not 0.0 <= o.vision_drop <= 1.0:
            raise BadInput(f"option vision_drop={o.vision_drop!r} of method 'vlmq' is not accepted; accepted: 0 to 1")
        if o.vision_weight < 0:
            raise BadInput(f"option vision_weight={o.vision_weight!r} of method 'vlmq' is not accepted; accepted: >= 0")
        self.blocks_info: list[dict] = []

    def on_start(self, run) -> None:
        self.blocks_info = []

    def solver_kwargs(self) -> dict:
        o = self.opts
        kw = dict(blocksize=o.blocksize, percdamp=o.percdamp, act_order=o.act_order, static_groups=o.static_groups)
        if o.base == "gptaq":
            kw["alpha"] = o.alpha
        return kw

    # ---- importance --------------------------------------------------------------------------
    def importance(self, block) -> tuple[dict[str, list[torch.Tensor]], dict]:
        """name -> per-batch (B, T) token factors (before `factor`), and this block's diagnostics."""
        o = self.opts
        proj = _attn_projections(block.linear_names)
        valid = [block.masks(b)["valid"] for b in range(block.n_batches)]
        uniform = [v.float() for v in valid]
        info: dict = {"block": getattr(block, "prefix", str(block.index)), "importance": o.importance}
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
    def _modality_means(block, gs: list[torch.Tensor]) -> dict:
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
    def quantize_block(self, block) -> None:
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
                stats.update(block.input_stats(weighted, stream=stream, weight_fn=lambda n, b: weights[n][b]))
            if plain:
                stats.update(block.input_stats(plain, stream=stream))
            for name in group:
                st = stats[name]
                dXXT = st.dXXT if o.base == "gptaq" else None
                block.commit(name, solve(block.weight(name), st.H, self.spec, dXXT=dXXT, **self.solver_kwargs()))

    def on_end(self, run) -> dict:
        fb = [i["block"] for i in self.blocks_info if i.get("fallback")]
        return {"importance": self.opts.importance, "factor": self.opts.factor, "base": self.opts.base,
                "fallback_blocks": fb, "blocks": self.blocks_info}
