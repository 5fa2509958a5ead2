#!/usr/bin/env python
"""How much weight noise does the testbed's decoder tolerate? (a diagnostic for issue 3)

Adds Gaussian noise to every decoder linear, each row's noise scaled to `level` times that row's
norm (W2 RTN g64 error is about 0.45x on the shipped testbed), and scores `synthvqa` accuracy and
answer NLL on the first --n eval items. A testbed on which quantizers can be told apart must lose
accuracy well before level 1.

    python scripts/noise_sensitivity.py --levels 0,0.25,0.5,1,2 --n 96
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ptqbench.benchmarks import tasks as T  # noqa: E402
from ptqbench.benchmarks import testbed as tb  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(tb.TESTBED_DIR), help="testbed checkpoint directory")
    ap.add_argument("--levels", default="0,0.25,0.5,1,2", help="noise norm / row norm, comma-separated")
    ap.add_argument("--n", type=int, default=96, help="eval items")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    model, proc = tb.load_testbed(args.model)
    lins = [m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith("model.language_model.layers")]
    orig = [lin.weight.data.clone() for lin in lins]
    for level in (float(x) for x in args.levels.split(",")):
        g = torch.Generator().manual_seed(args.seed)
        for lin, w in zip(lins, orig):
            noise = torch.randn(w.shape, generator=g)
            lin.weight.data = w + noise / noise.norm(dim=1, keepdim=True) * w.norm(dim=1, keepdim=True) * level
        acc = T.get_task("synthvqa").evaluate(model, proc, n=args.n, batch_size=32)
        nll = T.get_task("synthvqa-nll").evaluate(model, proc, n=args.n, batch_size=32)
        fams = " ".join(f"{f} {acc[f'acc/{f}']:.2f}" for f in ("count", "spatial"))
        print(f"noise {level:g}x row norm: acc {acc['acc']:.3f} ({fams}) nll {nll['nll']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
