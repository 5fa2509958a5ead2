"""The AWQ-style scale search AWQ and MBQ share: scale groups from the block layout, the alpha grid
search with a token-masked loss, and the folding of the chosen scales into the block.

For each scale group (an op, the linears it feeds, and the module whose output is compared) and each
alpha on the grid: s = mean_t|x|^alpha over valid tokens, clamped >= 1e-4 and divided by
sqrt(max s * min s); the group's linears become Q(W diag(s)) diag(s)^-1 and the loss compares the inspected
module's output with the FP output. The first strict minimum wins. Every group is searched on the
*original* block weights and FP-stream inputs; the scales are folded only after all groups are searched,
as in mit-han-lab/llm-awq `auto_scale_block`/`apply_scale`.

In a weight-activation format (`spec.act_bits < 16`) the candidate runs as the folded block will be
deployed, as thu-nics/MBQ `auto_scale_wa.py` (`WALinear`) does: each linear of the group gets Q(W diag(s))
and its input x / s quantized per token, Q_a(x / s); the reference output stays the FP module on FP inputs.
Weights-only (act_bits 16) takes the weight-only path above unchanged.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ptqbench.methods.base import BlockLayout, BlockView, Method, require_layout
from ptqbench.methods.quant import QuantSpec, fake_quant, grid_params, quantize_activation


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

    def selection(self, masks: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, int]]:
        """Per term, the flat indices of its tokens (in its mask and valid) and their number: found once per batch,
        they select the same elements in the same order as the boolean mask does."""
        out = []
        for key, _ in self.terms:
            idx = (masks[key] & masks["valid"]).reshape(-1).nonzero().squeeze(1)
            out.append((idx, int(idx.numel())))
        return out

    def partial(self, out: torch.Tensor, ref: torch.Tensor, masks: dict[str, torch.Tensor] | list) -> torch.Tensor:
        """Per-term [sum, element count] for one batch (float64, shape (n_terms, 2)); `masks` may be the batch's
        `selection`, to find the tokens once for many candidates."""
        chosen = masks if isinstance(masks, list) else self.selection(masks)
        d = out.float() - ref.float()
        d = d.abs() if self.power == 1 else d.pow(2)
        flat = d.reshape(-1, d.shape[-1])
        # selection by index (not multiplication by the mask): padded rows may hold anything, even NaN
        return torch.stack([torch.stack([flat[idx].sum().double(),
                                         torch.tensor(float(n * d.shape[-1]), dtype=torch.float64, device=d.device)])
                            for idx, n in chosen])

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


# ---- scale groups -----------------------------------------------------------------------------------
def scale_groups(layout: BlockLayout, block: nn.Module) -> list[dict]:
    """The scale groups of a decoder block: `prev` (and `prev_name`), the op whose output feeds `linears`;
    `inspect`, the module whose output the search compares (`attention`: it takes the layer kwargs);
    `kind`, attention or MLP. attn_norm -> q,k,v; v -> o only when the shapes match (skipped under
    GQA); mlp_norm -> gate,up; up -> down."""
    get = block.get_submodule
    groups = [dict(prev=get(layout.attn_norm), prev_name=layout.attn_norm, linears=[layout.q, layout.k, layout.v],
                   inspect=layout.attn, attention=True, kind="attn")]
    if get(layout.v).weight.shape == get(layout.o).weight.shape:
        groups.append(dict(prev=get(layout.v), prev_name=layout.v, linears=[layout.o], inspect=layout.o,
                           attention=False, kind="attn"))
    groups.append(dict(prev=get(layout.mlp_norm), prev_name=layout.mlp_norm, linears=[layout.gate, layout.up],
                       inspect=layout.mlp, attention=False, kind="mlp"))
    groups.append(dict(prev=get(layout.up), prev_name=layout.up, linears=[layout.down], inspect=layout.down,
                       attention=False, kind="mlp"))
    return groups


def group_inputs_needed(groups: list[dict], linear_names: list[str]) -> dict[str, str]:
    """linear -> the linear whose captured input it shares (the first linear of its scale group)."""
    rep = {}
    for g in groups:
        for n in g["linears"]:
            rep[n] = g["linears"][0]
    for n in linear_names:
        rep.setdefault(n, n)
    return rep


def capture_inputs(block: BlockView, names: list[str], stream: str = "fp") -> dict[str, list[torch.Tensor]]:
    """Full-shape inputs (B, T, d) of the named linears for every batch (kept on the compute device)."""
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for b in range(block.n_batches):
        got = block.linear_inputs(names, b, stream)
        for n in names:
            out[n].append(got[n])
    return out


def block_groups(block: BlockView, method: str) -> list[dict]:
    return scale_groups(require_layout(block.layout, method), block.block)


def run_inspect(module: nn.Module, x: torch.Tensor, kwargs: dict, attention: bool) -> torch.Tensor:
    """Output of the inspected module: the attention module takes the layer kwargs (mask, rotary
    embeddings), MLPs and linears only the input."""
    out = module(hidden_states=x, **kwargs) if attention else module(x)
    return out[0] if isinstance(out, tuple) else out


def _mean_abs_input(xs: list[torch.Tensor], masks: list[dict]) -> torch.Tensor:
    """mean_t |x_t| per input channel over the valid tokens of every batch."""
    total = torch.zeros(xs[0].shape[-1], device=xs[0].device)
    count = 0
    for x, m in zip(xs, masks):
        total += x[m["valid"]].float().abs().sum(0)
        count += int(m["valid"].sum())
    return total / max(count, 1)


class ScaledInputQuantizer:
    """Forward pre-hook of a candidate linear in the weight-activation search: its input divided by the
    candidate scales (what the folded preceding op will feed it), then quantized per token: Q_a(x / s).
    The division is rounded to the input's dtype first, as the folded op's output would be."""

    def __init__(self, bits: int):
        self.bits = bits
        self.scales: torch.Tensor | None = None  # set for each candidate alpha

    def __call__(self, module, args):
        x = args[0]
        return (quantize_activation((x.float() / self.scales).to(x.dtype), self.bits),) + tuple(args[1:])


def _set_candidate(cand: nn.Module, inspect: str, W0: dict[str, torch.Tensor], s: torch.Tensor, spec: QuantSpec,
                   dtype: torch.dtype, act_quant: ScaledInputQuantizer | None) -> None:
    """Weights of the candidate for scales s: weights only, Q(W diag(s)) diag(s)^-1 on the FP input;
    weight-activation, Q(W diag(s)) with the input hook computing Q_a(x / s) (MBQ's auto_scale_wa)."""
    for n, w in W0.items():
        lin = cand.get_submodule(_relative(n, inspect))
        if act_quant is None:
            lin.weight.data = (fake_quant_weight(w * s[None, :], spec) / s[None, :]).to(dtype)
        else:
            lin.weight.data = fake_quant_weight(w * s[None, :], spec).to(dtype)
    if act_quant is not None:
        act_quant.scales = s


@torch.no_grad()
def search_group_scale(block: BlockView, group: dict, xs: list[torch.Tensor], spec: QuantSpec, alphas: list[float],
                       loss: TokenLoss) -> ScaleResult:
    """Grid search of one scale group on FP inputs `xs` (one (B, T, d) tensor per calibration batch)."""
    inspect, names, attention = group["inspect"], list(group["linears"]), group["attention"]
    fp_mod = block.fp_block.get_submodule(inspect)
    cand = copy.deepcopy(fp_mod)
    dtype = next(fp_mod.parameters()).dtype
    W0 = {n: block.fp_block.get_submodule(n).weight.detach().float() for n in names}
    masks = [block.masks(b) for b in range(len(xs))]
    kwargs = [block.kwargs(b) for b in range(len(xs))]
    # what depends on the FP block, its inputs and the candidate's format alone is shared with every cell of a
    # lockstep pass that searches the same group (AWQ and MBQ at one format differ only in their loss)
    x_mean = block.memo(("scale_search.x_mean", inspect, tuple(names)), lambda: _mean_abs_input(xs, masks))
    refs = block.memo(("scale_search.refs", inspect), lambda: [run_inspect(fp_mod, x, kw, attention)
                                                              for x, kw in zip(xs, kwargs)])
    act_quant = ScaledInputQuantizer(spec.act_bits) if spec.quantizes_activations else None
    # on the candidate's copies of the group's linears only, as MBQ swaps in WALinears; the hooks go with `cand`
    if act_quant is not None:
        for n in names:
            cand.get_submodule(_relative(n, inspect)).register_forward_pre_hook(act_quant)

    chosen = [loss.selection(m) for m in masks]  # each term's tokens, found once for every candidate
    best, best_alpha, best_scales, history = float("inf"), None, None, []
    for alpha in alphas:
        s = scales_for(x_mean, alpha)

        def candidate_outputs(s=s):
            _set_candidate(cand, inspect, W0, s, spec, dtype, act_quant)
            return [run_inspect(cand, x, kw, attention) for x, kw in zip(xs, kwargs)]

        outs = block.memo(("scale_search.candidate", inspect, tuple(names), alpha, spec), candidate_outputs)
        acc = None
        for out, ref, m in zip(outs, refs, chosen):
            p = loss.partial(out, ref, m)
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


def search_block_scales(block: BlockView, spec: QuantSpec, alphas: list[float], loss_for: Callable[[dict], TokenLoss],
                        inputs: dict[str, list[torch.Tensor]] | None = None) -> tuple[list[ScaleResult], dict]:
    """Search every scale group of the block (`scale_groups` of its layout) on FP-stream inputs.

    Returns the results (not yet folded) and the captured inputs {linear: per-batch (B, T, d)},
    keyed by the first linear of each group (see `group_inputs_needed`)."""
    groups = block_groups(block, "scale search")
    rep = group_inputs_needed(groups, block.linear_names)
    if inputs is None:
        inputs = capture_inputs(block, sorted(set(rep.values()), key=block.linear_names.index), stream="fp")
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


def apply_scales(block: BlockView, results: list[ScaleResult]) -> dict[str, torch.Tensor]:
    """Fold every searched scale into the (to be quantized) block. Returns {linear: s} for the linears
    whose outputs are now divided by s (a scale folded into a preceding linear)."""
    divided = {}
    for r in results:
        fold_scales(block.block, r.prev_name, r.linears, r.scales)
        if isinstance(block.block.get_submodule(r.prev_name), nn.Linear):
            divided[r.prev_name] = r.scales
    return divided


def scaled_inputs(results: list[ScaleResult], inputs: dict, rep: dict[str, str], name: str) -> list[torch.Tensor]:
    """FP inputs of `name` after folding: divided by the scales of the group `name` belongs to."""
    xs = inputs[rep[name]]
    for r in results:
        if name in r.linears:
            s = r.scales.to(xs[0].device)
            return [x.float() / s for x in xs]
    return [x.float() for x in xs]


class ScaleSearchMethod(Method):
    """Base of the methods that fold searched scales into the block (AWQ, MBQ): the per-linear
    diagnostics multiply a linear's outputs back by the scale folded into them."""

    supports_vision = False  # scale groups need a decoder block layout

    def __init__(self, spec: QuantSpec, **options):
        super().__init__(spec, **options)
        self.folded_output_scales: dict[str, torch.Tensor] = {}  # of the block quantized last

    def fold(self, block: BlockView, results: list[ScaleResult]) -> None:
        self.folded_output_scales = apply_scales(block, results)

    def comparable_output(self, block: BlockView, name: str, y: torch.Tensor) -> torch.Tensor:
        s = self.folded_output_scales.get(name)
        return y if s is None else y * s.to(y)
