#!/usr/bin/env python
"""How much weight error does the testbed's decoder tolerate? (a diagnostic for issue 3)

For every decoder linear it scores `synthvqa` accuracy and answer NLL on the first --n eval items:
- ``--levels``: Gaussian noise, each row's noise `level` times that row's norm (for scale: the RTN
  rows print the same ratio for real quantization error);
- ``--rtn-bits``: round-to-nearest at those bits (group 64, asymmetric min-max, the `bench run` grid);
- ``--ranks``: first keep only each matrix's top-K singular components, then run the above on the
  truncated weights. If accuracy survives rank K, the decoder's function lives in K of its
  dimensions and the rest of every matrix is unused width -- the room where weight error goes unseen.

A testbed on which quantizers can be told apart must lose accuracy well before noise level 1.

    python experiments/noise_sensitivity.py --levels 0,0.25,0.5,1,2 --n 96
    python experiments/noise_sensitivity.py --ranks 0,32,16 --levels 0.5,1 --rtn-bits 2,3,4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptqbench.eval.registry import get_task  # noqa: E402
from ptqbench.models import testbed as tb  # noqa: E402
from ptqbench.methods.quant import QuantSpec, quantize_rtn  # noqa: E402


def top_rank(w: torch.Tensor, k: int) -> torch.Tensor:
    """w projected on its top-k singular components (k = 0: unchanged)."""
    if not k:
        return w
    u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
    return ((u[:, :k] * s[:k]) @ vh[:k]).to(w.dtype)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x != ""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(tb.TESTBED_DIR), help="testbed checkpoint directory")
    ap.add_argument("--levels", default="0,0.25,0.5,1,2", help="noise norm / row norm, comma-separated")
    ap.add_argument("--rtn-bits", default="", help="RTN g64 bit widths to score, comma-separated (e.g. 2,3,4)")
    ap.add_argument("--ranks", default="0", help="top-K truncations to apply first, comma-separated (0: none)")
    ap.add_argument("--n", type=int, default=96, help="eval items")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    model, proc = tb.load_testbed(args.model)
    lins = [m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith("model.language_model.layers")]
    orig = [lin.weight.data.clone() for lin in lins]

    def score(tag: str) -> None:
        acc = get_task("synthvqa").evaluate(model, proc, n=args.n, batch_size=32)
        nll = get_task("synthvqa-nll").evaluate(model, proc, n=args.n, batch_size=32)
        fams = " ".join(f"{f} {acc[f'acc/{f}']:.2f}" for f in ("count", "spatial"))
        print(f"{tag}: acc {acc['acc']:.3f} ({fams}) nll {nll['nll']:.4f}", flush=True)

    for k in ints(args.ranks):
        base = [top_rank(w, k) for w in orig]
        where = f"rank {k}, " if k else ""
        for level in (float(x) for x in args.levels.split(",") if x != ""):
            g = torch.Generator().manual_seed(args.seed)
            for lin, w in zip(lins, base):
                noise = torch.randn(w.shape, generator=g)
                lin.weight.data = w + noise / noise.norm(dim=1, keepdim=True) * w.norm(dim=1, keepdim=True) * level
            score(f"{where}noise {level:g}x row norm")
        for bits in ints(args.rtn_bits):
            spec = QuantSpec(bits=bits, group_size=64)
            errs = []
            for lin, w in zip(lins, base):
                lin.weight.data = quantize_rtn(w, spec).dequantize().to(w.dtype)
                errs.append(float(((lin.weight.data - w).norm(dim=1) / w.norm(dim=1)).mean()))
            score(f"{where}RTN W{bits} g64 (error {sum(errs) / len(errs):.2f}x row norm)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
