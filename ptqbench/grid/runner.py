"""The grid runner: one calibration set, every (method, bits, act_bits) cell, results into the store.

A cell is the quantized model, keyed by everything that produced it; its task scores and deployment
figures are units keyed by their own settings too (grid/store.py). A rerun computes exactly what is
missing: a cell whose quantization is stored but lacks a task is evaluated on its saved packed weights,
never re-quantized. Failures stay where they happen: an exception or a non-finite number in a cell's
quantization, one of its tasks or its latency is recorded against that piece, the rest is kept, and the
grid goes on. Cells are claimed in the store, so concurrent runs never compute one twice.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from ptqbench.config import RunConfig
from ptqbench.errors import BadInput
from ptqbench.grid.executors import get_executor
from ptqbench.grid.formats import fmt_s, run_formats
from ptqbench.grid.plan import FP_METHOD, Cell, CellOutcome, Grid, RunSummary, plan, prepare
from ptqbench.grid.preflight import validate_inputs, write_atomic
from ptqbench.grid.store import ResultsStore, process_owner


def missing(store, cell: Cell, force: bool) -> Cell | None:
    """The cell reduced to what the store lacks (None: nothing). `force` recomputes everything."""
    if force:
        return cell
    status = store.cell_status(cell.cell_id)
    done = store.done_units(cell.cell_id)
    units = [u for u in cell.units if u.unit_id not in done]
    quantize = cell.method != FP_METHOD and status != "done"
    if not quantize and not units:
        return None
    return dataclasses.replace(cell, units=units, quantize=quantize)


def _stored_file(grid: Grid, store, cell: Cell) -> Path | None:
    if cell.quantize or cell.method == FP_METHOD:
        return None
    rel = store.artifacts(cell.cell_id).get("model_file")
    path = Path(grid.cfg.grid.runs) / rel if rel else None
    return path if path is not None and path.is_file() else None


def _metrics(rows: list[dict], cell: Cell) -> dict:
    """The cell's figures for the summary: its recon rows and the rows of this run's units."""
    wanted = {u.unit_id for u in cell.units} | {""}
    return {f"{r['task']}/{r['metric']}": r["value"] for r in rows if (r.get("unit") or "") in wanted}


def run_grid(cfg: RunConfig, progress=None, log=print) -> RunSummary:
    """The grid; with `seeds`, once per calibration seed (each its own calibration set and run folder)."""
    seeds = cfg.calib.seeds
    if not seeds:
        return _run_one(cfg, progress, log)
    validate_inputs(cfg)  # every input checked once, before the first seed's work
    summaries = []
    for s in seeds:
        log(f"[seed {s}] the grid with calibration seed {s} ({seeds.index(s) + 1}/{len(seeds)})")
        name = None if cfg.grid.name is None else f"{cfg.grid.name}-seed{s}"
        summaries.append(_run_one(cfg.replace(seed=s, seeds=None, name=name), progress, log))
    cells = [CellOutcome(**{**c.__dict__, "method": f"{c.method} seed {s}" if c.method != FP_METHOD else c.method})
             for s, sm in zip(seeds, summaries) for c in sm.cells
             if not (c.method == FP_METHOD and s != seeds[0])]  # full precision does not depend on the seed
    last = summaries[-1]
    return RunSummary(last.run_dir, cfg.model.source, last.group_size, last.calib_manifest, cells)


class Bookkeeper:
    """The driver's side of an executor: claims a cell before it runs, writes its results to the store as
    they come back, and logs one line per cell start and end with the time left."""

    def __init__(self, grid: Grid, store: ResultsStore, cells: list[Cell], pending: list[Cell], log):
        self.grid, self.store, self.log, self.pending = grid, store, log, pending
        self.owner = process_owner()
        self.planned = {c.cell_id: c for c in cells}  # whole cells, for the summary (pending ones hold only what is missing)
        self.outcomes: list[CellOutcome] = []
        self.stored: dict[str, Path | None] = {}
        self.t0, self.done, self.spent = time.perf_counter(), 0, 0.0

    def _record_of(self, cell: Cell, calib: bool = True) -> dict:
        g = self.grid
        extra = dict(calib_manifest=g.manifest) if calib else {}
        return dict(cell.key, run_id=g.run_dir.name, env=g.env, config=g.cfg.to_dict(), **extra, device=g.env["device"])

    def _cached(self, cell: Cell, why: str) -> None:
        rows = self.store.rows(cell_id=cell.cell_id, status="ok")
        self.outcomes.append(CellOutcome(cell.method, cell.bits, "cached", _metrics(rows, self.planned[cell.cell_id]),
                                         act_bits=cell.act_bits, act_scheme=cell.act_scheme))
        self.log(f"{cell.method} {cell.fmt}: {why} (cell {cell.cell_id}), skipped"
                 + ("; use --force to recompute" if why == "already done" else ""))

    def started(self, cell: Cell) -> Cell | None:
        """Claim the cell; the part of it still missing (another run may have done some), or None to skip."""
        store = self.store
        busy = store.claim(cell.cell_id, self._record_of(cell), self.owner)
        if busy:
            self.outcomes.append(CellOutcome(cell.method, cell.bits, "busy", error=f"claimed by {busy}",
                                             act_bits=cell.act_bits, act_scheme=cell.act_scheme))
            self.log(f"[BUSY] {cell.method} {cell.fmt}: cell {cell.cell_id} is being computed by {busy}; left to it")
            return None
        todo = missing(store, cell, self.grid.cfg.grid.force)
        if todo is None:
            store.release(cell.cell_id, self.owner)
            self._cached(cell, "done meanwhile by another run")
            return None
        self.stored[cell.cell_id] = _stored_file(self.grid, store, todo)
        if todo.method != FP_METHOD and not todo.quantize and self.stored[cell.cell_id] is None:
            self.log(f"{cell.method} {cell.fmt}: its saved weights are gone, so it is quantized again for "
                     f"{', '.join(u.name for u in todo.units)}")
            todo.quantize = True
        if todo.quantize:
            store.start_cell(cell.cell_id, self._record_of(cell))
        i = self.pending.index(cell) + 1 if cell in self.pending else 0
        what = (["quantize"] if todo.quantize else []) + [u.name for u in todo.units]
        self.log(f"[{i}/{len(self.pending)}] {cell.method} {cell.fmt}: start ({', '.join(what)})")
        return todo

    def _write(self, cell: Cell, result: dict) -> list[str]:
        store, errors = self.store, []
        try:
            if result["quant"] is not None:
                try:
                    store.finish_cell(cell.cell_id, result["quant"]["rows"], result["quant"]["artifacts"])
                except BadInput as e:  # the store refused a row: this cell failed, its units were not computed on it
                    store.fail_cell(cell.cell_id, str(e))
                    raise
            for u in result["units"]:
                store.record_unit(cell.cell_id, u["unit"], u["kind"], u["key"], u["rows"], u["error"], u.get("items"))
                if u["error"]:
                    errors.append(f"{u['kind']} {u['key'].get('task', 'latency')}: {u['error'].splitlines()[0]}")
        except BadInput as e:  # the store refused a row: this cell's problem, not the grid's
            errors.append(f"store: {e}")
        finally:
            store.release(cell.cell_id, self.owner)
        return errors

    def finished(self, cell: Cell, result: dict, seconds: float) -> None:
        errors = self._write(cell, result)
        rows = self.store.rows(cell_id=cell.cell_id, status="ok")
        status = "failed" if errors else "done"
        self.outcomes.append(CellOutcome(cell.method, cell.bits, status, _metrics(rows, self.planned[cell.cell_id]),
                                         "; ".join(errors) or None, seconds, cell.act_bits, cell.act_scheme))
        for e in errors:
            self.log(f"[FAILED] {cell.method} {cell.fmt}: {e}")
        self._progress_line(cell, seconds, status)

    def failed(self, cell: Cell, error: str, detail: str, seconds: float) -> None:
        if self.store.cell_status(cell.cell_id) == "running":
            self.store.fail_cell(cell.cell_id, error + "\n" + detail)
        self.store.release(cell.cell_id, self.owner)
        self.outcomes.append(CellOutcome(cell.method, cell.bits, "failed", error=error, seconds=seconds,
                                         act_bits=cell.act_bits, act_scheme=cell.act_scheme))
        self.log(f"[FAILED] {cell.method} {cell.fmt}: {error}")
        self._progress_line(cell, seconds, "failed")

    def _progress_line(self, cell: Cell, seconds: float, status: str) -> None:
        self.done += 1
        self.spent += seconds
        left = len(self.pending) - self.done
        eta = self.spent / self.done * left
        self.log(f"[{self.done}/{len(self.pending)}] {cell.method} {cell.fmt}: {status} in {fmt_s(seconds)}; "
                 f"elapsed {fmt_s(time.perf_counter() - self.t0)}, about {fmt_s(eta)} left for {left} cell(s)")


def _run_one(cfg: RunConfig, progress=None, log=print) -> RunSummary:
    grid = prepare(cfg, progress, log)
    store = ResultsStore(cfg.grid.runs)
    cells = plan(grid)
    book = Bookkeeper(grid, store, cells, [], log)
    for cell in cells:
        todo = missing(store, cell, cfg.grid.force)
        if todo is None:
            book._cached(cell, "already done")
        else:
            book.pending.append(todo)
    get_executor(cfg.grid.executor, address=cfg.grid.address).run(
        grid, book.pending, book.started, book.finished, book.failed, progress,
        stored_file=lambda c: book.stored.get(c.cell_id), log=log)
    with grid.profile.phase("latency"):
        outcomes = book.outcomes + run_formats(grid, store, book.owner, log)  # latency: after the cells, all at once
    write_atomic(grid.run_dir / "profile.json", json.dumps(grid.profile.summary(), indent=2))
    if cfg.grid.profile:
        for line in grid.profile.lines():
            log(line)
    order = {(c.method, c.bits, c.act_bits): i for i, c in enumerate(cells)}
    outcomes.sort(key=lambda o: order.get((o.method, o.bits, o.act_bits), 0))
    return RunSummary(grid.run_dir, cfg.model.source, grid.group_size, grid.manifest, outcomes)
