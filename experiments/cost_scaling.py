#!/usr/bin/env python
"""Quantization cost vs model width and calibration tokens, on random-weight Qwen2-VL architectures.

The measurement issue 6 asks for on a GPU (Qwen2-VL-7B / Qwen2.5-VL-32B, 512 samples x 512 tokens)
does not fit a 2-core CPU, so this measures what does fit and how the cost scales: one decoder block
(``--max-blocks 1``; every block of these models has the same shapes) of Qwen2-VL-7B-shaped decoders
whose width is scaled down (hidden d, MLP 5.29 d, 128-dim heads, 4 KV heads: the 7B ratios) and of the
real 7B width, for GPTQ, GPTAQ and VLMQ, at a few calibration sizes. The vision tower is cut to 2
blocks (it only feeds the capture, which is not part of a cell's cost). Each row is one cell of
``bench run --model random:<config>@588`` through the normal runner; wall time and peak memory are the
store's ``calib_seconds`` / ``calib_peak_bytes`` (peak RSS on CPU, peak allocated on CUDA).

    python experiments/cost_scaling.py --widths 1024,2048,3584 --calib-n 4,8,16 --out docs/cost_scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def scaled_config(width: int, base: Path) -> dict:
    cfg = json.loads(base.read_text())
    heads = width // 128
    cfg.update(hidden_size=width, intermediate_size=int(round(width * 18944 / 3584 / 128)) * 128,
               num_attention_heads=heads, num_key_value_heads=min(4, heads), num_hidden_layers=2, max_window_layers=2)
    cfg["vision_config"].update(depth=2, hidden_size=width)
    return cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default="1024,2048,3584")
    ap.add_argument("--calib-n", default="8", help="calibration sample counts (comma-separated)")
    ap.add_argument("--methods", default="gptq,gptaq,vlmq")
    ap.add_argument("--token-widths", default="1024", help="widths at which every --calib-n is run (others: the first)")
    ap.add_argument("--image-side", type=int, default=588)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from ptqbench.config import RunConfig
    from ptqbench.grid.runner import run_grid
    from ptqbench.grid.store import ResultsStore

    base = ROOT / "docs" / "configs" / "qwen2-vl-7b.json"
    widths = [int(w) for w in args.widths.split(",")]
    ns = [int(n) for n in args.calib_n.split(",")]
    token_widths = {int(w) for w in args.token_widths.split(",")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in widths:
            cfg_path = Path(tmp) / f"qwen2-vl-w{w}.json"
            cfg_path.write_text(json.dumps(scaled_config(w, base)))
            for n in (ns if w in token_widths else ns[:1]):
                runs = Path(tmp) / f"runs-{w}-{n}"
                cfg = RunConfig(model=f"random:{cfg_path}@{args.image_side}", methods=args.methods.split(","), bits=[4],
                                group_size=128, calib_n=n, seq_len=512, max_blocks=1, latency=False, save_model=False,
                                device=args.device, dtype=args.dtype, runs=str(runs))
                t0 = time.time()
                summary = run_grid(cfg, log=lambda *_: None)
                store = ResultsStore(str(runs))
                for c in summary.cells:
                    if c.status != "done":
                        raise SystemExit(f"cell {c.method} at width {w} failed: {c.error}")
                    r = store.rows(method=c.method)[0]
                    rows.append(dict(width=w, intermediate=scaled_config(w, base)["intermediate_size"], calib_n=n,
                                     tokens=summary.calib_manifest["tokens"], method=c.method,
                                     seconds_per_block=r["calib_seconds"], peak_bytes=r["calib_peak_bytes"],
                                     device=r.get("device")))
                    print(json.dumps(rows[-1]), flush=True)
                print(f"width {w} calib-n {n}: {time.time() - t0:.0f}s wall", flush=True)
    meta = dict(command="python experiments/cost_scaling.py " + " ".join(sys.argv[1:] if argv is None else argv),
                cpu_count=os.cpu_count())
    if args.out:
        Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
