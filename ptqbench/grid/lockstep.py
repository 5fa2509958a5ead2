"""The lockstep schedule: the cells of a grid quantized together, in one pass over the blocks.

Per block the pass loads (or materializes) the block once, runs the full-precision block once on the one
full-precision stream, computes each full-precision value the cells ask for once, and lets every cell quantize
its own copy and advance its own quantized stream (engine/blockwise.py `quantize_models`). Whole-run
statistics of the full-precision model (MBQ's gradient pass) are computed once per grid (`Grid.memo`).

Memory: every cell of a pass holds its own model copy, quantized stream and quantized weights, so the cells are
grouped into chunks that fit a budget of host memory (`--memory-budget`, default half of the available RAM)
together with what a pass holds once (the FP streams and values, one cell's block work) and an allowance for
shared values and waiting work (`Footprint`, `PassPlan`); the log says how. Results are written cell by cell
after the pass, so an interrupted chunk recomputes only the cells it had not finished. Cells that only miss task scores (their weights are stored) are evaluated one by one.
"""

from __future__ import annotations

import copy
import time
import traceback
from dataclasses import dataclass

from ptqbench.config import parse_size
from ptqbench.deploy.measure import measure
from ptqbench.engine.blockwise import Job, quantize_models
from ptqbench.errors import one_line
from ptqbench.grid.cell import record_quantization, run_cell
from ptqbench.grid.plan import Cell, Grid

GiB = 2**30


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux); else the free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Footprint:
    """Host bytes a lockstep pass holds. Per cell: its quantized stream, its model copy and its quantized weights
    (kept until the pass ends). Shared: the FP stream, the next one, and the FP values cached for one block (its
    linears' inputs and outputs). Work: what one cell's block needs while it is quantized, measured and
    advanced (copies of the block, statistics, a search's outputs, a forward's activations); the cells of a
    pass do that work one after another, so it is counted once."""

    stream: int
    model: int
    shared: int
    result: int = 0
    work: int = 0

    @property
    def per_cell(self) -> int:
        # doubled: measured on the testbed, each cell a pass adds raises its peak resident memory by about 1.6x its
        # tensors (a cell's new weights and streams, allocated between other cells' block work, pin freed pages)
        return 2 * (self.stream + self.model + self.result)

    @property
    def fixed(self) -> int:
        """What a pass holds whatever its number of cells."""
        return self.shared + self.work


def _attention_heads(model, q_out: int) -> int:
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or getattr(cfg, "llm_config", None) or cfg
    return int(getattr(cfg, "num_attention_heads", 0) or max(1, q_out // 64))


def _result_bytes(linears, group_size: int) -> int:
    """uint8 codes, fp32 scale and zero per (row, group), int32 group index per column."""
    total = 0
    for lin in linears:
        g = lin.in_features if group_size <= 0 else min(group_size, lin.in_features)
        total += lin.out_features * lin.in_features + lin.out_features * -(-lin.in_features // g) * 8 + lin.in_features * 4
    return total


def work_bytes(block_linears: dict, block_params: int, batches, heads: int) -> int:
    """One cell's block work, estimated from shapes in fp32 (statistics are fp32 whatever the model's dtype):
    four copies of the block (the frozen FP one, a search's candidate module, a solve's stacked weights and its
    result), a Hessian and a cross term per linear, per calibration token two model-width tensors and one of
    the widest (a search's candidate outputs and references; AWQ's scaled inputs for clipping), and one batch's
    forward with gradients (the widest activations, and the attention scores). Doubled, plus a fixed 96 MiB:
    the budget bounds resident memory, which also holds what the allocator keeps of freed memory and the
    libraries' buffers (docs/experiments.md has the measurement)."""
    f32 = 4
    lins = list(block_linears.values())
    widest = max(max(lin.in_features, lin.out_features) for lin in lins)
    hidden = batches[0].hidden.shape[-1]
    tokens = sum(b.hidden.shape[0] * b.hidden.shape[1] for b in batches)
    batch, seq = max(b.hidden.shape[0] for b in batches), max(b.hidden.shape[1] for b in batches)
    live = (4 * block_params * f32
            + sum(2 * lin.in_features ** 2 for lin in lins) * f32
            + tokens * (2 * hidden + widest) * f32
            + batch * seq * (8 * hidden + 4 * widest) * f32
            + 3 * batch * heads * seq * seq * f32)
    return 2 * live + 96 * 2**20


def footprint(grid: Grid) -> Footprint:
    item = grid.dtype.itemsize
    batches = grid.calib.batches
    tokens = sum(b.hidden.shape[0] * b.hidden.shape[1] for b in batches)
    stream = sum(b.hidden.numel() for b in batches) * item
    model = sum(t.numel() * t.element_size() for t in list(grid.lm.model.parameters()) + list(grid.lm.model.buffers()))
    adapter = grid.lm.adapter
    block0 = adapter.decoder_layers()[0]
    linears = adapter.block_linears(block0)
    widths = sum(lin.in_features + lin.out_features for lin in linears.values())
    blocks = list(adapter.decoder_layers())
    if grid.cfg.quant.quantize_vision and adapter.vision_blocks() is not None:
        blocks += list(adapter.vision_blocks())
    result = _result_bytes([lin for blk in blocks for lin in adapter.block_linears(blk).values()], grid.group_size)
    heads = _attention_heads(grid.lm.model, next(iter(linears.values())).out_features)
    work = work_bytes(linears, sum(p.numel() for p in block0.parameters()), batches, heads)
    return Footprint(stream, model, 2 * stream + tokens * widths * item, result, work)


def chunk_size(fp: Footprint, budget: int) -> int:
    """Cells per pass: they take at most half of what the budget leaves after the pass's fixed part, so the values
    cells share (and the work waiting to run together) keep the other half; at least one cell."""
    return max(1, (budget - fp.fixed) // 2 // max(fp.per_cell, 1))


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def budget_bytes(grid: Grid) -> int:
    cfg = grid.cfg.grid
    return parse_size(cfg.memory_budget) if cfg.memory_budget else available_bytes() // 2


@dataclass
class PassPlan:
    """The cells to quantize in passes, with the footprint and budget (read once) they were grouped by."""

    chunks: list[list[Cell]]
    footprint: Footprint
    budget: int

    def memo_bytes(self, n_cells: int) -> int:
        """A quarter of what a pass of `n_cells` leaves of the budget: the most the values methods share per block
        may hold, and again the most the work waiting to run together across cells (`Together`) may hold; each
        counted twice, as a cell's tensors are (measured: the resident memory they cost is about twice their
        bytes, docs/experiments.md)."""
        return max(0, (self.budget - self.footprint.fixed - self.footprint.per_cell * n_cells) // 4)


def plan_chunks(grid: Grid, cells: list[Cell], log) -> PassPlan:
    """The cells to quantize grouped into chunks that fit the memory budget (logged). Cells of one format go
    together, next to each other: within a block, what one shares with another (a search candidate of that
    format) is then still held when the other asks for it."""
    cfg = grid.cfg.grid
    plan = PassPlan([], footprint(grid), budget_bytes(grid))
    fp, budget = plan.footprint, plan.budget
    size = chunk_size(fp, budget)
    cells = sorted(cells, key=lambda c: (c.act_bits, c.bits))  # stable: methods keep their plan order
    plan.chunks = [cells[i:i + size] for i in range(0, len(cells), size)]
    if cells:
        log(f"[schedule] lockstep: {len(cells)} cell(s) to quantize in {len(plan.chunks)} pass(es) of up to {size} "
            f"(host memory budget {_gib(budget)}{'' if cfg.memory_budget else ', half of the available RAM'}: "
            f"per cell {_gib(fp.per_cell)} = twice (quantized stream {_gib(fp.stream)} + model copy {_gib(fp.model)} + "
            f"quantized weights {_gib(fp.result)}); shared {_gib(fp.shared)}; one cell's block work {_gib(fp.work)}; "
            f"values methods share within a block, and work waiting to run together: "
            f"up to {_gib(plan.memo_bytes(len(plan.chunks[0])))} each)"
            + ("; even one cell exceeds the budget, so cells run one by one" if fp.fixed + fp.per_cell > budget else ""))
    return plan


def run_alone(grid, todo, progress, stored_file, finished, failed) -> None:
    """One claimed cell by itself (the cells schedule, or a cell missing only units): its failure is recorded."""
    t0 = time.perf_counter()
    try:
        result = run_cell(grid, todo, progress, stored_file(todo))
    except KeyboardInterrupt:
        failed(todo, "interrupted", "", time.perf_counter() - t0)
        raise
    except Exception as e:  # a failing cell is recorded, loudly, and the grid goes on
        failed(todo, one_line(e), traceback.format_exc(limit=8), time.perf_counter() - t0)
        return
    finished(todo, result, time.perf_counter() - t0)


def _finish(grid, todo, job, cost, schedule, progress, finished, failed) -> None:
    """Record one cell of a pass and score its units (its own failure stays its own)."""
    t0 = time.perf_counter()
    if job.error is not None:
        failed(todo, one_line(job.error), "".join(traceback.format_exception(job.error, limit=8)), job.seconds)
        return
    try:
        rec = record_quantization(grid, todo, job.model, job.result(), job.seconds, cost.peak_bytes, cost.kind, schedule)
        result = run_cell(grid, todo, progress, None, quantized=(job.model, *rec))
    except Exception as e:
        failed(todo, one_line(e), traceback.format_exc(limit=8), job.seconds + time.perf_counter() - t0)
        return
    finally:
        job.model = None  # this cell's copy is no longer needed
    finished(todo, result, job.seconds + time.perf_counter() - t0)


def _run_pass(grid: Grid, chunk: list[Cell], memo_bytes: int, started, finished, failed, progress, stored_file) -> None:
    todos = []
    for cell in chunk:
        todo = started(cell)
        if todo is None:
            continue
        if todo.quantize:
            todos.append(todo)
        else:  # done meanwhile, but for some units
            run_alone(grid, todo, progress, stored_file, finished, failed)
    if not todos:
        return
    cfg = grid.cfg.quant
    jobs = [Job(copy.deepcopy(grid.lm.model), grid.instances[t.instance_key]) for t in todos]
    t0 = time.perf_counter()
    pending = list(todos)
    try:
        with grid.profile.phase("quantization"), measure(grid.device) as cost:
            quantize_models(jobs, grid.calib, grid.device, progress, cfg.quantize_vision, cfg.max_blocks, memo=grid.memo,
                            memo_bytes=memo_bytes)
        schedule = dict(kind="lockstep", cells=len(todos), pass_seconds=round(time.perf_counter() - t0, 3))
        for todo, job in zip(todos, jobs):
            _finish(grid, todo, job, cost, schedule, progress, finished, failed)
            pending.remove(todo)
    except KeyboardInterrupt:
        for todo in pending:
            failed(todo, "interrupted", "", time.perf_counter() - t0)
        raise


def run_lockstep(grid: Grid, cells: list[Cell], started, finished, failed, progress=None,
                 stored_file=lambda cell: None, log=print) -> None:
    """The pending cells: those only missing units one by one, the rest in lockstep passes (the list is put in
    that order, so the log numbers cells as they run)."""
    cells.sort(key=lambda c: (c.quantize, c.act_bits, c.bits))  # stable: plan order within a format
    for cell in [c for c in cells if not c.quantize]:
        todo = started(cell)
        if todo is not None:
            run_alone(grid, todo, progress, stored_file, finished, failed)
    plan = plan_chunks(grid, [c for c in cells if c.quantize], log)
    for chunk in plan.chunks:
        _run_pass(grid, chunk, plan.memo_bytes(len(chunk)), started, finished, failed, progress, stored_file)
