"""GPTAQ ("GPTQv2", Li et al., ICML 2025): GPTQ with an asymmetric-calibration correction.

The objective is min ||W_hat X~ - W X||_F^2 where X~ are a linear's inputs on the *quantized* path (the
partly quantized block fed by the quantized stream) and X its full-precision inputs (the frozen FP
block fed by the FP stream). With dX = X - X~ the solution is GPTQ's column loop on H = 2/N X~ X~^T
plus a residual term built from the cross statistic dXXT = 2/N dX X~^T:

    P = alpha * triu_1(dXXT R^T) R            (R: upper Cholesky factor of H^-1, H^-1 = R^T R)

subtracted with each column *before* rounding (see `ptqbench.methods.gptq.solve`, which implements
both GPTQ and this correction).

Faithful to Intelligent-Computing-Lab-Yale/GPTQv2 `fake_quant/gptqv2_utils.py` (`GPTQv2`,
`gptqv2_fwrd`):
- true-sequential groups [q,k,v] -> [o] -> [gate,up] -> [down]; for each group the statistics come from
  one pass of the partly quantized block on the quantized stream (H, X~) and of the FP block on the FP
  stream (X), shared by the group's linears;
- alpha = 0.25 by default (hard-coded in the reference: "scale it by alpha due to collection of dXXT and
  H"); dead columns also zero dXXT[:, dead]; act-order permutes dXXT on both axes (both in `solve`);
- defaults as the reference's fake_quant: blocksize 128, percdamp 0.01, act_order off, static_groups off.

Differences from the reference, all shared with our GPTQ: statistics are averaged over valid
(non-padding) tokens rather than sequences (a global scale of H and dXXT cancels in P and in the relative
damping), and with dynamic groups smaller than the block size a group's grid is taken from the weights
as updated so far (see `gptq.py`). With alpha = 0 (or equal streams, dXXT = 0) GPTAQ is GPTQ bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

from ptqbench.methods.base import Method, option
from ptqbench.methods.gptq import solve
from ptqbench.methods.registry import register


@dataclass
class GPTAQOptions:
    alpha: float = option(0.25, "scale of the asymmetric correction P = alpha*triu(dXXT R^T) R (0.25 as in the reference; 0 = GPTQ)")
    blocksize: int = option(128, "lazy-batch block size B (columns updated together)")
    percdamp: float = option(0.01, "damping as a fraction of mean(diag H)")
    act_order: bool = option(False, "quantize columns in order of decreasing diag(H) (dXXT permuted alike)")
    static_groups: bool = option(False, "precompute group grids from the original weights")


@register
class GPTAQ(Method):
    name = "gptaq"
    summary = "GPTAQ (GPTQv2): GPTQ on quantized-stream inputs plus an asymmetric correction towards the FP outputs"
    Options = GPTAQOptions
    streams = "both"

    def solver_kwargs(self) -> dict:
        o = self.opts
        return dict(blocksize=o.blocksize, percdamp=o.percdamp, act_order=o.act_order,
                    static_groups=o.static_groups, alpha=o.alpha)

    def quantize_block(self, block) -> None:
        for group in block.groups:
            stats = block.input_stats(group, stream="both")
            for name in group:
                st = stats[name]
                block.commit(name, solve(block.weight(name), st.H, self.spec, dXXT=st.dXXT, **self.solver_kwargs()))
