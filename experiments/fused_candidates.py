#!/usr/bin/env python
"""Would computing the three formats' AWQ/MBQ search candidates in one forward pass make lockstep faster on
this CPU? (issue 20)

A candidate of the q/k/v scale group runs the attention module with that format's q, k and v weights on the
same FP inputs. Fusing the formats means either one product with the formats' weights concatenated along the
output dimension (the inputs are the same), or the rest of the module on the formats' outputs stacked along
the batch. This times both against separate calls, on the testbed's shapes (batch 4, 88 tokens, width 256,
4 heads of 64, k/v 128 wide), in interleaved rounds (every path in turn, so a burst of load hits all alike),
and checks that the fused results are bit-identical to the separate ones on this machine.

    OMP_NUM_THREADS=2 PYTHONPATH=. python experiments/fused_candidates.py [--rounds 7 --calls 300]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F


def paths(batch: int, tokens: int, width: int, heads: int, kv: int, formats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, tokens, width, generator=gen)
    ws = [torch.randn(n, width, generator=gen) for _ in range(formats) for n in (width, kv, kv)]
    wcat = torch.cat(ws)
    hd = width // heads
    qkv = [[torch.randn(batch, heads, tokens, hd, generator=gen) for _ in range(3)] for _ in range(formats)]
    mask = torch.zeros(batch, 1, tokens, tokens)
    stacked = [torch.cat([f[i] for f in qkv]) for i in range(3)]
    mask_n = mask.repeat(formats, 1, 1, 1)
    return {
        "products, separate": lambda: [F.linear(x, w) for w in ws],
        "products, one concatenated": lambda: F.linear(x, wcat).split([w.shape[0] for w in ws], dim=-1),
        "attention, separate": lambda: [F.scaled_dot_product_attention(q, k, v, attn_mask=mask) for q, k, v in qkv],
        "attention, one stacked batch": lambda: F.scaled_dot_product_attention(*stacked, attn_mask=mask_n).chunk(formats),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args()
    fns = paths(batch=4, tokens=88, width=256, heads=4, kv=128, formats=3)
    for f in fns.values():  # warm up
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    load = os.getloadavg()[0]
    for _ in range(args.rounds):
        for name, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(args.calls):
                f()
            times[name].append((time.perf_counter() - t0) / args.calls * 1e3)
    print(f"load average {load:.2f} before, {os.getloadavg()[0]:.2f} after; {torch.get_num_threads()} torch threads")
    for name, v in times.items():
        print(f"{name:30s} median {statistics.median(v):.3f} ms per call (min {min(v):.3f}, max {max(v):.3f})")
    names = list(fns)
    for a, b in ((names[0], names[1]), (names[2], names[3])):
        same = all(torch.equal(p, q) for p, q in zip(fns[a](), fns[b]()))
        ratio = statistics.median(times[b]) / statistics.median(times[a])
        print(f"{b} / {a.split(',')[0]} separate: {ratio:.3f}; bit-identical here: {same}")


if __name__ == "__main__":
    main()
