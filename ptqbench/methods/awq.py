"""AWQ (Lin et al., 2024): activation-aware per-channel scaling, then a clipping search, then RTN.

Follows mit-han-lab/llm-awq @d6e797a (`awq/quantize/auto_scale.py: auto_scale_block/apply_scale`,
`auto_clip.py: auto_clip_layer/apply_clip`, `pre_quant.py: run_awq`):

- Scale groups (from the adapter): input_layernorm -> q,k,v (inspect self_attn); v_proj -> o_proj only
  when the shapes match (skipped under GQA); post_attention_layernorm -> gate,up (inspect mlp);
  up_proj -> down_proj. Every group is searched on the *original* block weights and FP-stream inputs;
  the scales are folded only after all groups of the block are searched (as in the reference).
- Candidates: for alpha in {0, 1/n_grid, ..., (n_grid-1)/n_grid}: s = mean_t|x|^alpha (over valid
  tokens), clamped >= 1e-4, divided by sqrt(max s * min s); the group's linears become
  Q(W diag(s)) diag(s)^-1 and the loss compares the inspected module's output with the FP output.
  The first strict minimum wins.
- Folding: a norm's weight (and bias) is divided by s (checked numerically: a norm with an offset such
  as Gemma's (1 + w) is refused); a preceding linear's rows (and bias) are divided by s; the following
  linears' columns are multiplied by s.
- Clip search (`auto_clip_layer`): per output row and group, max_val = absmax * (1 - i/20), i = 0..9,
  minimising the mean over sampled tokens (every (N // 512)-th valid token) of the squared per-group
  partial dot-product error; q_proj/k_proj are not clipped. The weights are clamped to
  [-max_val, max_val] and then quantized with RTN on the shared grid (min/max of the clamped weights).

Deliberate differences: padding tokens are masked out of the activation statistic, the losses and the
clip samples (the reference calibrates on unpadded text blocks); arithmetic is done in fp32 (the
reference runs in the model dtype, usually fp16); the sampling stride is max(1, N // clip_tokens) (the
reference fails when fewer than 512 tokens are given).

Checked against llm-awq (fp32, one Llama decoder layer with outlier channels, W3 g128 and W4 g64,
1024 tokens): the same alpha for all four groups, bit-identical scales, folded norm weights, clip
max_val of every clipped linear and final quantized weights of all seven linears.

The scale search is written once (`search_block_scales` with a `TokenLoss`); MBQ reuses it with its
modality-weighted losses.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ptqbench.methods.base import Method, option
from ptqbench.methods.quant import QuantizedWeight, QuantSpec, fake_quant, grid_params, quantize_rtn
from ptqbench.methods.registry import register


# ---- losses -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenLoss:
    """A token-masked reconstruction loss over the output channels of the inspected module.

    terms: (mask name, weight) pairs; a token counts in a term when it is in that mask and valid.
    power: 2 (squared error) or 1 (absolute error).
    shared_denominator: False -> sum_j w_j * mean_{elements of term j}(|dY|^p)  (AWQ; MBQ's MSE);
                        True  -> sum_j w_j * sum_{term j}|dY|^p / sum_j K_j   (MBQ's MAE),
    where element counts are tokens x channels, as in the reference. Terms with no tokens drop out.
    """

    terms: tuple[tuple[str, float], ...] = (("valid", 1.0),)
    power: int = 2
    shared_denominator: bool = False

    def partial(self, out: torch.Tensor, ref: torch.Tensor, masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-term [sum, element count] for one batch (float64, shape (n_terms, 2))."""
        d = out.float() - ref.float()
        d = d.abs() if self.power == 1 else d.pow(2)
        rows = []
        for key, _ in self.terms:
            m = masks[key] & masks["valid"]
            # boolean selection (not multiplication): padded rows may hold anything, even NaN
            rows.append(torch.stack([d[m].sum().double(), torch.tensor(float(int(m.sum()) * d.shape[-1]), dtype=torch.float64, device=d.device)]))
        return torch.stack(rows)

    def value(self, acc: torch.Tensor) -> float:
        sums, counts = acc[:, 0].tolist(), acc[:, 1].tolist()
        weights = [w for _, w in self.terms]
        if self.shared_denominator:
            total = sum(counts)
            return sum(w * s for w, s in zip(weights, sums)) / total if total else 0.0
        return sum(w * s / c for w, s, c in zip(weights, sums, counts) if c)


MSE_ALL = TokenLoss()


# ---- scale search ---------------------------------------------------------------------------------
@dataclass
class ScaleResult:
    prev_name: str  # op the scales fold into (norm or linear), relative to the block
    linears: list[str]  # linears whose input columns are multiplied by the scales
    inspect: str  # module whose output the search compares
    alpha: float
    scales: torch.Tensor  # (in_features,) float32
    loss: float
    history: list[float] = field(default_factory=list)


def alpha_grid(n_grid: int = 20, alpha_max: float = 1.0) -> list[float]:
    """llm-awq's ratios i / n_grid for i in range(n_grid) (1.0 excluded), kept up to alpha_max."""
    return [i / n_grid for i in range(n_grid) if i / n_grid <= alpha_max + 1e-12]


def scales_for(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    s = x_mean.pow(alpha).clamp(min=1e-4).view(-1)
    return s / (s.max() * s.min()).sqrt()


def fake_quant_rows(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quantize the rows of a 2-D tensor, each row one group (shared grid)."""
    scale, zero = grid_params(w, spec)
    return fake_quant(w.float(), scale, zero, spec.maxq)


def fake_quant_weight(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """RTN fake-quant of a (out, in) weight, per row and group: `quantize_rtn(w).dequantize()`."""
    rows, cols = w.shape
    g = spec.groups_for(cols)
    return fake_quant_rows(w.float().reshape(-1, g), spec).reshape(rows, cols)


def _relative(name: str, inspect: str) -> str:
    if name == inspect:
        return ""
    if not name.startswith(inspect + "."):
        raise ValueError(f"linear {name!r} is not inside the inspected module {inspect!r}")
    return name[len(inspect) + 1:]


def run_inspect(module: nn.Module, inspect: str, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Output of the inspected module: attention modules take the layer kwargs (mask, rotary
    embeddings), MLPs and linears only the input."""
    if isinstance(module, nn.Linear) or "attn" not in inspect.rsplit(".", 1)[-1]:
        out = module(x)
    else:
        out = module(hidden_states=x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def group_inputs_needed(groups: list[dict], linear_names: list[str]) -> dict[str, str]:
    """linear -> the linear whose captured input it shares (the first linear of its scale group)."""
    rep = {}
    for g in groups:
        for n in g["linears"]:
            rep[n] = g["linears"][0]
    for n in linear_names:
        rep.setdefault(n, n)
    return rep


@torch.no_grad()
def search_group_scale(block, group: dict, xs: list[torch.Tensor], spec: QuantSpec, alphas: list[float],
                       loss: TokenLoss) -> ScaleResult:
    """Grid search of one scale group on FP inputs `xs` (one (B, T, d) tensor per calibration batch)."""
    inspect, names = group["inspect"], list(group["linears"])
    fp_mod = block.fp_block.get_submodule(inspect)
    cand = copy.deepcopy(fp_mod)
    dtype = next(fp_mod.parameters()).dtype
    W0 = {n: block.fp_block.get_submodule(n).weight.detach().float() for n in names}
    masks = [block.masks(b) for b in range(len(xs))]
    kwargs = [block.kwargs(b) for b in range(len(xs))]

    total = torch.zeros(xs[0].shape[-1], device=xs[0].device)
    count = 0
    for x, m in zip(xs, masks):
        total += x[m["valid"]].float().abs().sum(0)
        count += int(m["valid"].sum())
    x_mean = total / max(count, 1)
    refs = [run_inspect(fp_mod, inspect, x, kw) for x, kw in zip(xs, kwargs)]

    best, best_alpha, best_scales, history = float("inf"), None, None, []
    for alpha in alphas:
        s = scales_for(x_mean, alpha)
        for n in names:
            lin = cand.get_submodule(_relative(n, inspect))
            lin.weight.data = (fake_quant_weight(W0[n] * s[None, :], spec) / s[None, :]).to(dtype)
        acc = None
        for x, kw, ref, m in zip(xs, kwargs, refs, masks):
            p = loss.partial(run_inspect(cand, inspect, x, kw), ref, m)
            acc = p if acc is None else acc + p
        value = loss.value(acc)
        history.append(value)
        if value < best:
            best, best_alpha, best_scales = value, alpha, s
    if best_scales is None:
        raise FloatingPointError(f"AWQ scale search for {names} found no finite loss: {history}")
    if torch.isnan(best_scales).any():
        raise FloatingPointError(f"AWQ scales for {names} contain NaN")
    return ScaleResult(group["prev_name"], names, inspect, best_alpha, best_scales.detach(), best, history)


def search_block_scales(block, spec: QuantSpec, alphas: list[float], loss_for: Callable[[dict], TokenLoss],
                        inputs: dict[str, list[torch.Tensor]] | None = None) -> tuple[list[ScaleResult], dict]:
    """Search every scale group of the block (adapter's `scale_groups`) on FP-stream inputs.

    Returns the results (not yet folded) and the captured inputs {linear: per-batch (B, T, d)},
    keyed by the first linear of each group (see `group_inputs_needed`)."""
    groups = block.adapter.scale_groups(block.block)
    rep = group_inputs_needed(groups, block.linear_names)
    if inputs is None:
        inputs = block.capture_inputs(sorted(set(rep.values()), key=block.linear_names.index), stream="fp")
    results = [search_group_scale(block, g, inputs[g["linears"][0]], spec, alphas, loss_for(g)) for g in groups]
    return results, inputs


# ---- folding ----------------------------------------------------------------------------------------
def _check_norm_scales_output(norm: nn.Module, scales: torch.Tensor) -> None:
    """Folding s into a norm assumes norm(x; w / s) = norm(x; w) / s. Check it numerically on a probe."""
    probe = copy.deepcopy(norm).float()
    d = scales.numel()
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(4, d, generator=gen).to(scales.device)
    with torch.no_grad():
        y = probe(x)
        probe.weight.data = probe.weight.data / scales
        if getattr(probe, "bias", None) is not None:
            probe.bias.data = probe.bias.data / scales
        y2 = probe(x)
    want = y / scales
    if not torch.allclose(y2, want, rtol=1e-4, atol=1e-6 * float(want.abs().max())):
        raise ValueError(
            f"AWQ folds its scales into {type(norm).__name__}'s weight, but that norm does not scale its output "
            "by its weight (an offset such as Gemma's (1 + w)?); accepted: RMSNorm/LayerNorm with a plain weight")


@torch.no_grad()
def fold_scales(module: nn.Module, prev_name: str, linears: list[str], scales: torch.Tensor) -> None:
    """Fold s into the block: prev op's output / s (norm weight+bias, or linear rows+bias), following
    linears' columns * s. The block's function is unchanged (up to rounding in the weight dtype)."""
    prev = module.get_submodule(prev_name)
    s = scales.float().to(prev.weight.device)
    if isinstance(prev, nn.Linear):
        if prev.out_features != s.numel():
            raise ValueError(f"{prev_name}: {prev.out_features} outputs but {s.numel()} scales")
        prev.weight.data = (prev.weight.data.float() / s[:, None]).to(prev.weight.dtype)
    else:
        if getattr(prev, "weight", None) is None or prev.weight.shape != s.shape:
            raise ValueError(f"{prev_name}: cannot fold AWQ scales into {type(prev).__name__}")
        _check_norm_scales_output(prev, s)
        prev.weight.data = (prev.weight.data.float() / s).to(prev.weight.dtype)
    if getattr(prev, "bias", None) is not None:
        prev.bias.data = (prev.bias.data.float() / s).to(prev.bias.dtype)
    for n in linears:
        lin = module.get_submodule(n)
        lin.weight.data = (lin.weight.data.float() * s[None, :].to(lin.weight.device)).to(lin.weight.dtype)


def apply_scales(block, results: list[ScaleResult]) -> None:
    """Fold every searched scale into the (to be quantized) block and tell the diagnostics about
    linears whose outputs are now divided by s."""
    for r in results:
        fold_scales(block.block, r.prev_name, r.linears, r.scales)
        if isinstance(block.block.get_submodule(r.prev_name), nn.Linear):
            block.set_output_scale(r.prev_name, r.scales)


def scaled_inputs(results: list[ScaleResult], inputs: dict, rep: dict[str, str], name: str) -> list[torch.Tensor]:
    """FP inputs of `name` after folding: divided by the scales of the group `name` belongs to."""
    xs = inputs[rep[name]]
    for r in results:
        if name in r.linears:
            s = r.scales.to(xs[0].device)
            return [x.float() / s for x in xs]
    return [x.float() for x in xs]


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


def is_qk(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("q_proj", "k_proj")


# ---- the method -------------------------------------------------------------------------------------
@dataclass
class AWQOptions:
    n_grid: int = option(20, "scale search grid: alpha = i / n_grid for i < n_grid")
    alpha_max: float = option(1.0, "largest alpha tried (0 = only alpha 0, i.e. no scaling)")
    clip: bool = option(True, "run AWQ's weight clipping search (q/k excluded)")
    clip_tokens: int = option(512, "tokens sampled for the clipping search")


@register
class AWQ(Method):
    name = "awq"
    summary = "AWQ: activation-aware channel scaling (alpha grid search) + clipping search, then RTN"
    Options = AWQOptions
    streams = "fp"
    supports_vision = False

    def __init__(self, spec: QuantSpec, **options):
        super().__init__(spec, **options)
        self.info: dict = {"alpha": {}, "clip_ratio": {}}

    def loss_for(self, group: dict) -> TokenLoss:
        return MSE_ALL

    def quantize_block(self, block) -> None:
        alphas = alpha_grid(self.opts.n_grid, self.opts.alpha_max)
        results, inputs = search_block_scales(block, self.spec, alphas, self.loss_for)
        apply_scales(block, results)
        self.info["alpha"][str(block.index)] = {r.prev_name: r.alpha for r in results}
        rep = group_inputs_needed(block.adapter.scale_groups(block.block), block.linear_names)
        masks = [block.masks(b)["valid"] for b in range(block.n_batches)]
        ratios = {}
        for name in block.linear_names:
            w = block.weight(name)
            if self.opts.clip and not is_qk(name):
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
