"""GPTAQ ("GPTQv2", Li et al., ICML 2025): GPTQ with an asymmetric-calibration correction.

The objective is min ||W_hat X~ - W X||_F^2, X~ a linear's inputs on the quantized path (the partly
quantized block on the quantized stream) and X its full-precision inputs (the FP block on the FP stream).
The solution is GPTQ's column loop on H = 2/N X~ X~^T plus a residual term from the cross statistic
dXXT = 2/N (X - X~) X~^T (`ptqbench.methods.gptq.solve`). Per true-sequential group [q,k,v] -> [o] ->
[gate,up] -> [down], one pass on each stream gives the statistics the group's linears share. alpha = 0.25
as in Intelligent-Computing-Lab-Yale/GPTQv2; with alpha = 0 (or equal streams) GPTAQ is GPTQ bit for bit.
Provenance and deviations: docs/methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from ptqbench.methods.base import BlockView, Method, option
from ptqbench.methods.gptq import Solve, SolverOptions, input_stats


@dataclass
class GPTAQOptions(SolverOptions):
    alpha: float = option(0.25, "scale of the asymmetric correction P = alpha*triu(dXXT R^T) R (0.25 as in the reference; 0 = GPTQ)")

    def solver_kwargs(self) -> dict:
        return dict(super().solver_kwargs(), alpha=self.alpha)


class GPTAQ(Method):
    name = "gptaq"
    summary = "GPTAQ (GPTQv2): GPTQ on quantized-stream inputs plus an asymmetric correction towards the FP outputs"
    Options = GPTAQOptions
    streams = "both"

    def quantize_block(self, block: BlockView):
        for group in block.groups:
            stats = input_stats(block, group, stream="both")
            done = yield [Solve(block.weight(n), stats[n].H, self.spec, dXXT=stats[n].dXXT, **self.opts.solver_kwargs())
                          for n in group]
            for name, qw in zip(group, done):
                block.commit(name, qw)
