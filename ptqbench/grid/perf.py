"""`bench perf`: the grid's quantization under both schedules, side by side in one process, on one prepared
grid (the same model and calibration set): wall time per schedule in interleaved rounds, the ratio, the
peak memory of lockstep against the footprint it reports, and a check that both give the same quantized
weights, diagnostics and method info. Nothing is written to the store."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import statistics
import time

from ptqbench.config import RunConfig
from ptqbench.deploy.measure import measure, release_free_memory, rss_bytes
from ptqbench.engine.blockwise import Job, quantize_models
from ptqbench.grid.lockstep import GiB, PassPlan, plan_chunks
from ptqbench.grid.plan import FP_METHOD, Grid, plan, prepare
from ptqbench.grid.preflight import validate_inputs


def digest(job: Job) -> str:
    """sha256 of a job's quantized tensors, diagnostics (timings left out) and method info."""
    h = hashlib.sha256()
    for name in sorted(job.quantized):
        qw = job.quantized[name]
        for t in (qw.qweight, qw.scale, qw.zero, qw.g_idx):
            h.update(name.encode() + t.contiguous().numpy().tobytes())
    diag = {k: v for k, v in job.diag.items() if not k.endswith("seconds")}
    h.update(json.dumps([diag, job.info], sort_keys=True, default=str).encode())
    return h.hexdigest()


def _jobs(grid: Grid, cells) -> list[Job]:
    return [Job(copy.deepcopy(grid.lm.model), copy.deepcopy(grid.instances[c.instance_key])) for c in cells]


def _pass(grid: Grid, cells, lockstep: PassPlan | None) -> tuple[float, int, dict[str, str]]:
    """(seconds, peak host bytes above the start, {cell id: digest}) of quantizing `cells`: in the lockstep
    plan's passes, or (None) one cell at a time."""
    q = grid.cfg.quant
    chunks = lockstep.chunks if lockstep is not None else [[c] for c in cells]
    memo = {} if lockstep is not None else None
    release_free_memory()  # what the other schedule freed but the process kept would hide part of this one's peak
    digests, base = {}, rss_bytes()
    t0 = time.perf_counter()
    with measure(grid.device) as cost:
        for chunk in chunks:
            jobs = _jobs(grid, chunk)
            quantize_models(jobs, grid.calib, grid.device, None, q.quantize_vision, q.max_blocks, memo=memo,
                            memo_bytes=lockstep.memo_bytes(len(jobs)) if lockstep is not None else 0)
            for cell, job in zip(chunk, jobs):
                if job.error is not None:
                    raise RuntimeError(f"{job.method.name} w{job.method.spec.bits}: {job.error}")
                digests[cell.cell_id] = digest(job)
            del jobs
    return time.perf_counter() - t0, max(0, cost.peak_bytes - base), digests


def perf(cfg: RunConfig, repeats: int = 2, log=print) -> dict:
    validate_inputs(cfg)
    grid = prepare(cfg, log=lambda *a: None, new_run_dir=False)
    cells = [c for c in plan(grid) if c.method != FP_METHOD]
    passes = plan_chunks(grid, cells, log)  # one plan for every round, so the rounds are alike
    fp, n = passes.footprint, len(passes.chunks[0]) if passes.chunks else 0
    load = [os.getloadavg()]
    times: dict[str, list[float]] = {"cells": [], "lockstep": []}
    peaks: dict[str, list[int]] = {"cells": [], "lockstep": []}
    same = True
    for r in range(repeats):
        got = {}
        for schedule in ("cells", "lockstep"):
            seconds, peak, digests = _pass(grid, cells, passes if schedule == "lockstep" else None)
            times[schedule].append(seconds)
            peaks[schedule].append(peak)
            got[schedule] = digests
            log(f"[perf] round {r + 1}/{repeats} {schedule}: {seconds:.1f} s, peak {peak / GiB:.2f} GiB above the start")
        same = same and got["cells"] == got["lockstep"]
    load.append(os.getloadavg())
    med = {s: statistics.median(v) for s, v in times.items()}
    return dict(cells=len(cells), repeats=repeats, seconds=times, median=med,
                ratio=med["lockstep"] / med["cells"], pair_ratios=[b / a for a, b in zip(times["cells"], times["lockstep"])],
                identical=same, peak_bytes=peaks, within_budget=max(peaks["lockstep"]) <= passes.budget,
                footprint=dict(per_cell=fp.per_cell, shared=fp.shared, work=fp.work, budget=passes.budget,
                               memo_cap=passes.memo_bytes(n), cells_per_pass=n, passes=len(passes.chunks),
                               lockstep_estimate=fp.fixed + fp.per_cell * n),
                load_before=load[0], load_after=load[1], cpu_count=os.cpu_count(), torch_threads=_threads())


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def report_lines(res: dict) -> list[str]:
    fpr = res["footprint"]
    return [
        f"quantization of {res['cells']} cells, {res['repeats']} interleaved round(s) per schedule "
        f"(load average {res['load_before'][0]:.2f} before, {res['load_after'][0]:.2f} after; "
        f"{res['cpu_count']} CPUs, {res['torch_threads']} torch threads)",
        f"  cells    median {res['median']['cells']:.1f} s  {['%.1f' % s for s in res['seconds']['cells']]}",
        f"  lockstep median {res['median']['lockstep']:.1f} s  {['%.1f' % s for s in res['seconds']['lockstep']]}",
        f"  lockstep / cells = {res['ratio']:.3f} (per round: {', '.join('%.3f' % x for x in res['pair_ratios'])})",
        f"  identical weights, diagnostics and method info: {'yes' if res['identical'] else 'NO'}",
        f"  peak memory above the start: lockstep {max(res['peak_bytes']['lockstep']) / GiB:.2f} GiB against its budget "
        f"{fpr['budget'] / GiB:.2f} GiB ({'within' if res['within_budget'] else 'OVER'}; {fpr['passes']} pass(es) of up to {fpr['cells_per_pass']} cells: streams, copies, "
        f"quantized weights and one cell's block work estimated at {fpr['lockstep_estimate'] / GiB:.2f} GiB, plus up to "
        f"{fpr['memo_cap'] / GiB:.2f} GiB of shared values and as much of work waiting to run together, each counted twice), "
        f"cells {max(res['peak_bytes']['cells']) / GiB:.2f} GiB",
    ]
