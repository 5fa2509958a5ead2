"""MBQ (Li et al., CVPR 2025): modality-balanced AWQ-style scale search for VLMs.

Follows thu-nics/MBQ (`qmllm/methods/mbq/quantize`): `auto_scale.py` for weights only and, when the
format quantizes activations, `auto_scale_wa.py` (the shared search quantizes the group's inputs too).
Vision tokens are weighted against answer tokens in the scale-search loss by rho = max(r_l, median_l r),
r_l the layer's ratio of mean |dL/dY| over vision and answer positions (answer-token cross-entropy, at
the outputs of o and down), separately for attention and MLP. Then RTN, no clipping. "Answer" is the reference's caption set
(labels != -100), i.e. the calibration `reply` mask: the whole assistant turn from its `<|im_start|>`.
The gradient pass runs each calibration batch once and backpropagates layer by layer with recomputation
(one layer's graph alive at a time). Algorithm notes, options beyond the reference, deviations and how
it was checked: docs/methods.md.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ptqbench.errors import BadInput
from ptqbench.methods.base import BlockView, RunView, option, require_layout
from ptqbench.methods.quant import QuantSpec, quantize_rtn
from ptqbench.methods.scale_search import ScaleSearchMethod, TokenLoss, alpha_grid, search_block_scales

# MBQ's token sets -> calibration masks. "answer" is the reference's caption set (labels != -100): the
# whole assistant turn from its `<|im_start|>`, i.e. the calibration `reply` mask, not `answer`.
ANSWER_MASK = "reply"
MODALITY_MASKS = {"vision": "vision", "answer": ANSWER_MASK}


def gradient_taps(run: RunView) -> dict[str, str]:
    """kind -> the linear whose output gradient is measured: attention's o, the MLP's down."""
    layout = require_layout(run.layout, "mbq")
    return {"attn": layout.o, "mlp": layout.down}


class _OnDevice:
    """Temporarily move a module to the compute device (no-op when it already lives there)."""

    def __init__(self, module: nn.Module, device: torch.device):
        self.module, self.device = module, device
        self.home = next(module.parameters()).device

    def __enter__(self):
        if self.home != self.device:
            self.module.to(self.device)
        return self.module

    def __exit__(self, *exc):
        if self.home != self.device:
            self.module.to(self.home)


def answer_ce_per_sample(logits_fn, hidden: torch.Tensor, input_ids: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Sum over samples of each sample's mean cross-entropy on its answer tokens (shifted: the hidden
    state at t predicts token t+1, which must be an answer token). MBQ passes the `reply` mask, so the
    targets are the assistant turn from its `<|im_start|>`, as the reference's labels."""
    tgt = answer[:, 1:]
    rows = hidden[:, :-1][tgt]
    labels = input_ids[:, 1:][tgt]
    if rows.shape[0] == 0:
        return hidden.sum() * 0.0
    ce = F.cross_entropy(logits_fn(rows).float(), labels, reduction="none")
    counts = tgt.sum(1)  # targets per sample
    per_token_weight = (1.0 / counts.clamp(min=1).float()).repeat_interleave(counts)
    return (ce * per_token_weight.to(ce.device)).sum()


def _record(stats: dict, kind: str, i: int, masks: dict):
    """A tensor hook adding each sample's mean |dL/dY| over its vision and answer positions."""
    def hook(g):
        g = g.detach().float()
        for r in range(g.shape[0]):
            for mod, key in MODALITY_MASKS.items():
                m = masks[key][r]
                if m.any():
                    stats[kind][mod][i].append(float(g[r][m].abs().mean()))
    return hook


def _backward_through_layers(run: RunView, batch, hs: list[torch.Tensor], grad: torch.Tensor, kinds: dict[str, str],
                             stats: dict, masks: dict) -> None:
    """Backward from the top layer to layer 0, recomputing each layer with a graph, recording dL/dY."""
    layers = run.decoder_layers()
    for i in reversed(range(len(layers))):
        layer = layers[i]
        with torch.enable_grad(), _OnDevice(layer, run.device):
            def tap(kind, i=i):
                def fwd(mod, args, y):
                    if y.requires_grad:
                        y.register_hook(_record(stats, kind, i, masks))
                return fwd

            handles = [layer.get_submodule(path).register_forward_hook(tap(kind)) for kind, path in kinds.items()]
            try:
                x = hs[i].detach().requires_grad_(True)
                y = run.decoder_step(i, layer, x, batch)
                (gx,) = torch.autograd.grad(y, x, grad_outputs=grad.to(y.dtype))
            finally:
                for h in handles:
                    h.remove()
        grad = gx


@torch.no_grad()
def modality_gradients(run: RunView, kinds: dict[str, str] | None = None) -> dict:
    """Per layer and kind: lists of per-sample mean |dL/dY| over vision and over answer positions
    ("answer": the calibration `reply` mask, see the module docstring)."""
    kinds = gradient_taps(run) if kinds is None else kinds
    device = run.device
    layers = run.decoder_layers()
    stats = {k: {"vision": [[] for _ in layers], "answer": [[] for _ in layers]} for k in kinds}
    n_samples = run.n_samples
    for b in range(run.n_batches):
        batch = run.batch(b)
        masks = {k: v & batch.masks["valid"] for k, v in batch.masks.items()}
        # forward without a graph, keeping each layer's input
        hs = [batch.hidden]
        for i, layer in enumerate(layers):
            with _OnDevice(layer, device):
                hs.append(run.decoder_step(i, layer, hs[-1], batch))
        # loss at the top
        with torch.enable_grad(), _OnDevice(run.final_norm(), device), _OnDevice(run.lm_head(), device):
            top = hs[-1].detach().requires_grad_(True)
            # / n_samples as the reference (loss / accum_steps): cancels in rho, keeps |dL/dY| comparable
            loss = answer_ce_per_sample(run.logits, top, batch.input_ids, masks[ANSWER_MASK]) / n_samples
            (grad,) = torch.autograd.grad(loss, top, allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(hs[-1])
        _backward_through_layers(run, batch, hs, grad, kinds, stats, masks)
        del hs
    return stats


def modality_ratios(stats: dict, n_layers: int) -> dict:
    """r_l = mean_samples(g_v) / mean_samples(g_a); rho_l = max(r_l, median r) per kind."""
    out: dict = {}
    for kind, s in stats.items():
        gv, ga = [], []
        for i in range(n_layers):
            if not s["vision"][i]:
                raise BadInput("MBQ needs image-text calibration: no calibration sample has vision tokens "
                               "(accepted: an image-text calibration set, e.g. synthvqa or ShareGPT4V with images)")
            if not s["answer"][i]:
                raise BadInput("MBQ needs answer tokens in the calibration samples (the assistant turn); none found")
            gv.append(sum(s["vision"][i]) / len(s["vision"][i]))
            ga.append(sum(s["answer"][i]) / len(s["answer"][i]))
        if any(a == 0 for a in ga):
            raise FloatingPointError(f"MBQ: zero answer-token gradient at {kind} layer(s) {[i for i, a in enumerate(ga) if a == 0]}")
        r = [v / a for v, a in zip(gv, ga)]
        med = statistics.median(r)  # numpy's median: mean of the two middle values for an even count
        out[kind] = dict(grad_vision=gv, grad_answer=ga, ratio=r, median=med, rho=[max(x, med) for x in r],
                         n_samples_vision=len(s["vision"][0]), n_samples_answer=len(s["answer"][0]))
    return out


def mbq_loss(loss: str, rho: float) -> TokenLoss:
    """MBQ's scale-search loss: answer tokens (the `reply` mask) with weight 1, vision tokens with rho."""
    if loss == "mae":
        return TokenLoss(((ANSWER_MASK, 1.0), ("vision", float(rho))), power=1, shared_denominator=True)
    return TokenLoss(((ANSWER_MASK, 1.0), ("vision", float(rho))), power=2, shared_denominator=False)


@dataclass
class MBQOptions:
    loss: str = option("mae", "reconstruction loss of the scale search", choices=("mae", "mse"))
    reweight: bool = option(True, "weight vision tokens by the gradient ratio rho (False: rho = 1)")
    token_weights: str = option("modality", "modality: answer (the assistant turn from its <|im_start|>) and "
                                "vision tokens (weights 1, rho); uniform: all "
                                "valid tokens, weight 1 (the reference's reweight=false)", choices=("modality", "uniform"))
    n_grid: int = option(20, "scale search grid: alpha = i / n_grid for i < n_grid")
    alpha_max: float = option(1.0, "largest alpha tried")


class MBQ(ScaleSearchMethod):
    name = "mbq"
    summary = "MBQ: AWQ-style scale search with gradient-based vision/answer loss weights, then RTN"
    Options = MBQOptions
    streams = "fp"
    needs_whole_model = True  # the gradient pass runs every decoder layer before block 0 is quantized

    def __init__(self, spec: QuantSpec, **options):
        super().__init__(spec, **options)
        self.modality: dict | None = None
        self.alphas: dict = {}

    def on_start(self, run: RunView) -> None:
        if self.opts.token_weights == "uniform":
            return
        masks = [run.batch_masks(b) for b in range(run.n_batches)]
        if not all(ANSWER_MASK in m for m in masks):
            raise BadInput(f"MBQ needs the calibration set's {ANSWER_MASK!r} mask (the assistant turn from its "
                           "<|im_start|>); this set lacks it (accepted: a set captured by build_calibration)")
        if not any(bool(m["vision"].any()) for m in masks):
            raise BadInput("MBQ needs image-text calibration: the calibration set has no vision tokens "
                           "(accepted: an image-text calibration set, e.g. synthvqa or ShareGPT4V with images)")
        if self.opts.reweight:
            n = len(run.decoder_layers())
            # the gradient pass depends on the FP model and the calibration set only: once per grid
            stats = run.memo(("mbq.modality_gradients", tuple(sorted(gradient_taps(run).items()))),
                             lambda: modality_gradients(run))
            self.modality = modality_ratios(stats, n)

    def rho(self, index: int, kind: str) -> float:
        if self.modality is None:
            return 1.0
        return self.modality[kind]["rho"][index]

    def quantize_block(self, block: BlockView) -> None:
        o = self.opts

        def loss_for(group: dict) -> TokenLoss:
            if o.token_weights == "uniform":
                return TokenLoss((("valid", 1.0),), power=1 if o.loss == "mae" else 2)
            return mbq_loss(o.loss, self.rho(block.index, group["kind"]))

        results, _ = search_block_scales(block, self.spec, alpha_grid(o.n_grid, o.alpha_max), loss_for)
        self.fold(block, results)
        self.alphas[str(block.index)] = {r.prev_name: r.alpha for r in results}
        for name in block.linear_names:
            block.commit(name, quantize_rtn(block.weight(name), self.spec))

    def on_end(self, run) -> dict:
        info: dict = {"alpha": self.alphas, "token_weights": self.opts.token_weights, "loss": self.opts.loss}
        if self.modality is not None:
            for kind, m in self.modality.items():
                for k, v in m.items():
                    info[f"{k}_{kind}"] = v
        return info
