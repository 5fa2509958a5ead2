#!/usr/bin/env python
"""Is object position in the testbed's vision tokens, and does its decoder read it? (issue 3, spatial)

1. A linear probe on the vision-tower output of object tokens (calib-split scenes, 80/20 split):
   held-out accuracy for the token's grid column and for the left/right half of the image.
2. Greedy answers of the checkpoint to `spatial` questions and to the training-only `where`
   question (one object against the image centre) on train-distribution scenes of a data seed no
   training run uses.
If (1) is high and (2) is at chance, the information is there and the decoder does not use it.

    python experiments/position_probe.py [--model DIR] [--images 600] [--questions 120]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptqbench.data import synthvqa as sv  # noqa: E402
from ptqbench.eval import tasks as T  # noqa: E402
from ptqbench.models import testbed as tb  # noqa: E402
from testbed.vision import vision_features  # noqa: E402

UNUSED_DATA_SEED = 777


def linear_probe(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 500) -> float:
    """Held-out accuracy (last 20%) of a softmax-regression probe trained on the first 80%."""
    n = len(x)
    tr = torch.arange(n) < int(0.8 * n)
    lin = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.Adam(lin.parameters(), 1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(x[tr]), y[tr]).backward()
        opt.step()
    with torch.no_grad():
        return float((lin(x[~tr]).argmax(-1) == y[~tr]).float().mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(tb.TESTBED_DIR), help="testbed checkpoint directory")
    ap.add_argument("--images", type=int, default=600, help="calib-split scenes for the probe")
    ap.add_argument("--questions", type=int, default=120, help="scenes for the spatial / where answers")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, proc = tb.load_testbed(args.model)

    groups, cells = sv.generate_multi_with_cells("calib", args.images, seed=3)
    imgs = torch.from_numpy(np.stack([np.asarray(g[0].image.convert("RGB")) for g in groups]))
    feats = vision_features(model, imgs, proc.image_processor, torch.device("cpu"))
    cells = torch.from_numpy(np.stack(cells)).reshape(len(groups), sv.GRID * sv.GRID, 3)
    obj = cells[..., 1] > 0  # tokens whose grid cell holds part of an object
    col = (torch.arange(sv.GRID * sv.GRID) % sv.GRID).expand(len(groups), -1)[obj]
    x = feats[obj]
    print(f"object tokens: {len(x)}; linear probe held-out accuracy: grid column "
          f"{linear_probe(x, col, sv.GRID):.3f}, left/right half {linear_probe(x, (col >= sv.GRID // 2).long(), 2):.3f}")

    qs = sv.generate_multi("train", args.questions, seed=UNUSED_DATA_SEED, extra=("where",))
    for fam in ("spatial", "where"):
        items = [it for g in qs for it in g if it.family == fam]
        pred = [T.normalize(p) for p in T.SynthVQAAccuracy().predict(model, proc, items, batch_size=32)]
        acc = sum(p == T.normalize(it.answer) for p, it in zip(pred, items)) / len(items)
        print(f"{fam}: accuracy {acc:.3f} on {len(items)} questions (chance 0.25); answers {dict(Counter(pred))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
