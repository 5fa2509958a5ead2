"""MBQ (Li et al., CVPR 2025): modality-balanced AWQ-style scale search for VLMs.

Follows thu-nics/MBQ @a4d460d (`qmllm/methods/mbq/quantize/pre_quant.py: run_mbq, GradCacheHook`,
`auto_scale.py: auto_scale_block`), weight-only path (`wa_quant=False`, `distort=False`):

"Answer" tokens below are the reference's caption set, labels != -100: its labels are -100 up to the last
`<|im_start|>` (`qmllm/models/qwen2_vl/qwen2_vl.py`), so the set is the whole assistant turn from its
opening `<|im_start|>`: the header `<|im_start|>assistant\n`, the answer and the closing `<|im_end|>\n`.
That is the calibration set's `reply` mask (not its `answer` mask, which starts after the header). The
stats keep the reference's name ("answer": grad_answer_*, n_samples_answer_*).

1. Modality weights (`on_start`, when `reweight`): the answer-token cross-entropy (logits at position t
   predict token t+1; targets are the answer tokens, so the first target is the turn's `<|im_start|>`,
   predicted from the token before it; mean per sample, as the HF loss with labels) is
   back-propagated through all decoder layers, the final norm and the lm_head. Per sample and per layer,
   g_v = mean |dL/dY| over vision positions x channels and g_a the same over answer positions, at the
   outputs Y of o_proj (attention) and down_proj (MLP); both are averaged over samples; r_l = g_v / g_a;
   rho_l = max(r_l, median_l r), separately for attention and MLP.
2. Per block, the AWQ grid search (shared with `ptqbench.methods.awq`) with MBQ's loss:
   MAE (default): (sum_answer |dY| + rho * sum_vision |dY|) / (K_answer + K_vision);
   MSE: mean_answer(dY^2) + rho * mean_vision(dY^2); tokens in neither set are ignored (so the header's
   positions, including the one that predicts the first answer token, are in the loss). rho_attn is used
   for the q,k,v and o groups, rho_mlp for gate,up and down. No clipping search. Then RTN.

How the gradients are computed: the reference runs one forward+backward per sample (batch 1). Here each
calibration batch runs once, with loss = sum over its samples of each sample's mean answer CE. Batch rows
never interact in a decoder, so dL/dY of row i is exactly the gradient of sample i's own loss; the
per-sample statistics are then taken row by row, which reproduces the batch-1 numbers (checked in the
tests). The backward runs layer by layer with recomputation (only one layer's graph is alive at a time),
so a model whose layers live on the CPU can still be processed on the accelerator one layer at a time.

Checked against thu-nics/MBQ: `auto_scale_block` (MAE and MSE, rho 0.37/2.5) picks the same alphas
with bit-identical scales as the shared search with `mbq_loss`; the loss values agree with the
reference expressions to ~1e-7 (fp64 vs fp32 sums); the ratios, medians and rho from `GradCacheHook`
(batch 1, full HF model with labels) agree to <2e-7 relative on the tiny Qwen2-VL and Qwen3-VL. Those
checks fed both sides the same token sets; which tokens those are (labels from the last `<|im_start|>`)
is checked in the tests against labels built the reference's way from the token ids.

Options beyond the reference: `token_weights="uniform"` treats all valid tokens as one set with weight 1
(no gradient pass). The reference's `reweight: false` path (plain mean loss over the whole sequence) is
`token_weights="uniform"` here (padding excluded); `reweight=False` with modality masks keeps the
answer/vision sets and uses rho = 1. Differences: padding is masked out of every statistic; the Qwen2-VL
replay uses the captured M-RoPE position embeddings (the reference falls back to 1-D positions); a sample
without vision (or answer) tokens is skipped for that modality (the reference would produce NaN). The
answer set is the `reply` mask, measured from the chat template's generation prompt (its token count per
sample) rather than found by searching for the last `<|im_start|>` id; for Qwen-style templates the two
are the same tokens. Text-only samples (no template) have every token in the set, as before.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ptqbench.errors import BadInput
from ptqbench.methods.awq import TokenLoss, alpha_grid, apply_scales, search_block_scales
from ptqbench.methods.base import Method, option
from ptqbench.methods.quant import QuantSpec, quantize_rtn
from ptqbench.methods.registry import register

KINDS = {"attn": "self_attn.o_proj", "mlp": "mlp.down_proj"}
# MBQ's token sets -> calibration masks. "answer" is the reference's caption set (labels != -100): the
# whole assistant turn from its `<|im_start|>`, i.e. the calibration `reply` mask, not `answer`.
ANSWER_MASK = "reply"
MODALITY_MASKS = {"vision": "vision", "answer": ANSWER_MASK}


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


@torch.no_grad()
def modality_gradients(run, kinds: dict[str, str] = KINDS) -> dict:
    """Per layer and kind: lists of per-sample mean |dL/dY| over vision and over answer positions
    ("answer": the calibration `reply` mask, see the module docstring)."""
    adapter, device = run.adapter, run.device
    layers = adapter.decoder_layers()
    stats = {k: {"vision": [[] for _ in layers], "answer": [[] for _ in layers]} for k in kinds}

    def record(kind: str, i: int, masks: dict):
        def hook(g):
            g = g.detach().float()
            for r in range(g.shape[0]):
                for mod, key in MODALITY_MASKS.items():
                    m = masks[key][r]
                    if m.any():
                        stats[kind][mod][i].append(float(g[r][m].abs().mean()))
        return hook

    n_samples = len(run.calib)
    for b in range(len(run.calib.batches)):
        hidden, kwargs, extras, masks, ids = run.batch(b)
        masks = {k: v & masks["valid"] for k, v in masks.items()}
        # forward without a graph, keeping each layer's input
        hs = [hidden]
        for i, layer in enumerate(layers):
            with _OnDevice(layer, device):
                hs.append(adapter.after_layer(i, adapter.run_layer(layer, hs[-1], kwargs), extras))
        # loss at the top
        with torch.enable_grad(), _OnDevice(adapter.final_norm(), device), _OnDevice(adapter.lm_head(), device):
            top = hs[-1].detach().requires_grad_(True)
            # / n_samples as the reference (loss / accum_steps): cancels in rho, keeps |dL/dY| comparable
            loss = answer_ce_per_sample(adapter.logits, top, ids, masks[ANSWER_MASK]) / n_samples
            (grad,) = torch.autograd.grad(loss, top, allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(hs[-1])
        # backward layer by layer, recomputing each layer with a graph
        for i in reversed(range(len(layers))):
            layer = layers[i]
            with torch.enable_grad(), _OnDevice(layer, device):
                def tap(kind, i=i):
                    def fwd(mod, args, y):
                        if y.requires_grad:
                            y.register_hook(record(kind, i, masks))
                    return fwd

                handles = [layer.get_submodule(path).register_forward_hook(tap(kind)) for kind, path in kinds.items()]
                try:
                    x = hs[i].detach().requires_grad_(True)
                    y = adapter.after_layer(i, adapter.run_layer(layer, x, kwargs), extras)
                    (gx,) = torch.autograd.grad(y, x, grad_outputs=grad.to(y.dtype))
                finally:
                    for h in handles:
                        h.remove()
            grad = gx
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


def group_kind(group: dict) -> str:
    return "attn" if "attn" in group["linears"][0].split(".")[0] else "mlp"


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


@register
class MBQ(Method):
    name = "mbq"
    summary = "MBQ: AWQ-style scale search with gradient-based vision/answer loss weights, then RTN"
    Options = MBQOptions
    streams = "fp"
    supports_vision = False
    needs_whole_model = True  # the gradient pass runs every decoder layer before block 0 is quantized

    def __init__(self, spec: QuantSpec, **options):
        super().__init__(spec, **options)
        self.modality: dict | None = None
        self.alphas: dict = {}

    def on_start(self, run) -> None:
        if self.opts.token_weights == "uniform":
            return
        if not all(ANSWER_MASK in b.masks for b in run.calib.batches):
            raise BadInput(f"MBQ needs the calibration set's {ANSWER_MASK!r} mask (the assistant turn from its "
                           "<|im_start|>); this set lacks it (accepted: a set captured by build_calibration)")
        if not any(bool(b.masks["vision"].any()) for b in run.calib.batches):
            raise BadInput("MBQ needs image-text calibration: the calibration set has no vision tokens "
                           "(accepted: an image-text calibration set, e.g. synthvqa or ShareGPT4V with images)")
        if self.opts.reweight:
            n = len(run.adapter.decoder_layers())
            self.modality = modality_ratios(modality_gradients(run), n)

    def rho(self, index: int, kind: str) -> float:
        if self.modality is None:
            return 1.0
        return self.modality[kind]["rho"][index]

    def quantize_block(self, block) -> None:
        o = self.opts

        def loss_for(group: dict) -> TokenLoss:
            if o.token_weights == "uniform":
                return TokenLoss((("valid", 1.0),), power=1 if o.loss == "mae" else 2)
            return mbq_loss(o.loss, self.rho(block.index, group_kind(group)))

        results, _ = search_block_scales(block, self.spec, alpha_grid(o.n_grid, o.alpha_max), loss_for)
        apply_scales(block, results)
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
