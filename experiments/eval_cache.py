#!/usr/bin/env python
"""Evaluation time of a grid's cells with and without the grid's evaluation cache (`ptqbench.eval.cache`).

Scores the default grid's tasks (`synthvqa`, `synthvqa-nll`, n items in batches of the grid's EVAL_BATCH)
on a few cells' models of the testbed: full precision and RTN (group 64, as the default grid) at the given
bit widths. "plain" is evaluation as it was before the cache: every task call renders its items, encodes
its batches and runs the vision tower; "cached" shares one `EvalCache` (and the item memo) across the cells
as `bench run` does. Both must give the same floats (checked); the script prints seconds per cell and the
ratio, with the machine's load. Rounds alternate plain / cached so that a change of load hits both.

    OMP_NUM_THREADS=1 python experiments/eval_cache.py --bits 4,2 --n 200 --rounds 2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rtn_models(lm, bits: list[int], group_size: int) -> dict:
    """{"fp": the model, "rtn w<b>": a copy with RTN decoder weights} (the grid's weight-only RTN cells)."""
    import torch

    from ptqbench.methods.quant import QuantSpec, quantize_rtn

    models = {"fp": lm.model}
    for b in bits:
        m = copy.deepcopy(lm.model)
        with torch.no_grad():
            for lin in m.get_submodule(lm.adapter.decoder_path).modules():
                if isinstance(lin, torch.nn.Linear):
                    lin.weight.copy_(quantize_rtn(lin.weight, QuantSpec(bits=b, group_size=group_size)).dequantize())
        models[f"rtn w{b}"] = m
    return models


def score_cells(models: dict, processor, n: int, batch: int, cache) -> tuple[dict, dict]:
    """({cell: seconds}, {cell: every score's value and items}) for both tasks of every cell."""
    from ptqbench.eval.registry import get_task

    secs, scores = {}, {}
    for cell, model in models.items():
        t0 = time.perf_counter()
        scores[cell] = {(t, m): (s.value, s.items) for t in ("synthvqa", "synthvqa-nll")
                        for m, s in get_task(t).scores(model, processor, n=n, batch_size=batch, cache=cache).items()}
        secs[cell] = time.perf_counter() - t0
    return secs, scores


def one_round(models, processor, n, batch, mode):
    from ptqbench.data import synthvqa as sv
    from ptqbench.eval.cache import EvalCache

    if mode == "plain":  # as before the cache: every task call renders its items again
        sv._generate_memo.cache_clear()
        shared, sv.generate_shared = sv.generate_shared, lambda split, n, seed=None: sv.generate(split, n, seed)
        try:
            return score_cells(models, processor, n, batch, None) + (None,)
        finally:
            sv.generate_shared = shared
    sv._generate_memo.cache_clear()
    fp = models["fp"]
    from ptqbench.models.adapters import adapter_for

    cache = EvalCache(fp, adapter_for(fp).vision_tower_path)
    return score_cells(models, processor, n, batch, cache) + (cache,)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="4,2", help="RTN cells' bit widths (besides full precision)")
    ap.add_argument("--n", type=int, default=200, help="eval items per task (the default grid's 200)")
    ap.add_argument("--rounds", type=int, default=1, help="plain/cached pairs, alternating")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)

    import torch

    from ptqbench.grid.plan import EVAL_BATCH
    from ptqbench.models.sources import load_model

    lm = load_model("testbed", torch.float32)
    models = rtn_models(lm, [int(b) for b in args.bits.split(",")], group_size=64)
    times = {"plain": [], "cached": []}
    ref, stats = None, None
    for r in range(args.rounds):
        for mode in ("plain", "cached") if r % 2 == 0 else ("cached", "plain"):
            secs, scores, cache = one_round(models, lm.processor, args.n, EVAL_BATCH, mode)
            if ref is None:
                ref = scores
            if scores != ref:
                print(f"round {r} {mode}: scores differ from the first round's", file=sys.stderr)
                return 1
            times[mode].append(secs)
            if cache is not None:
                stats = dict(cache.stats, mbytes=round(cache.nbytes / 2**20, 1))
            print(f"round {r} {mode:6s}: " + ", ".join(f"{c} {s:.2f}s" for c, s in secs.items())
                  + f"; total {sum(secs.values()):.2f}s; load {os.getloadavg()[0]:.2f}", flush=True)
    med = {mode: {c: statistics.median(t[c] for t in ts) for c in ts[0]} for mode, ts in times.items()}
    total = {mode: sum(v.values()) for mode, v in med.items()}
    print(f"median total: plain {total['plain']:.2f}s, cached {total['cached']:.2f}s, "
          f"ratio {total['cached'] / total['plain']:.3f}; identical scores; cache {stats}")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(median=med, total=total, rounds=times, cache=stats,
                                                  n=args.n, threads=torch.get_num_threads()), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
