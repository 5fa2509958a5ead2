"""The `ray` executor: every pending cell becomes a Ray task; results stream back to the driver.

Division of labour:
- The driver (`run_grid`) has already prepared the grid: validated it, loaded the model and captured
  the calibration set into the cache under `<runs>/.calib`. It alone writes the results store.
- A task rebuilds the `RunConfig`, calls `prepare(cfg, new_run_dir=False)` (which loads the cached
  calibration instead of capturing it again), runs `run_cell` and returns plain data. The prepared
  grid is kept per worker process, so a worker that runs several cells loads the model once.
- The driver marks a cell started when it submits it, and writes each result as soon as `ray.wait`
  hands it back: a driver killed mid-grid loses nothing already finished, and the next run retries
  the cells left 'running' (that is the ordinary resume).

Failures: an exception in a cell is caught in the task and comes back as a failed cell (one-line
message, traceback as detail); it is not retried. A worker that *dies* (killed, segfault, OOM kill)
is a system failure: Ray re-runs the task, up to `max_retries` times, before the cell is recorded
as failed.

Clusters: with `address` the executor joins that cluster. The runs folder must then be visible at
the same path on every node (a shared filesystem) for the workers to find the driver's calibration
cache and for saved models to land beside the run; a worker that captures its own calibration is
accepted only if its content hash equals the driver's. Workers need ptqbench installed. A Ray
connection already open in this process (`ray.init` called by the caller) is used as is and left
open. Worker output is not echoed to the driver (errors come back with the cells); it is in Ray's
session logs on each node (`ray logs`, or session_latest/logs under Ray's temp folder).
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from collections.abc import Callable

from ptqbench.errors import BadInput, one_line

MAX_RETRIES = 2  # re-runs of a cell whose worker died (system failures only)

# Per worker process: the prepared grid of the config it last ran (key: the config as JSON). One
# entry only, so a long-lived worker serving different runs does not keep old models alive.
_GRIDS: dict[str, object] = {}


def _import_ray():
    try:
        import ray
    except ImportError:
        raise BadInput("executor 'ray' needs Ray: pip install 'ptqbench[ray]'") from None
    return ray


def _plain(obj):
    """What the store would keep of it: JSON types only (tensors -> lists, non-string keys -> str)."""
    from ptqbench.grid.store import canonical_json

    return json.loads(canonical_json(obj))


def _worker_grid(cfg_json: str, calib_hash: str):
    from ptqbench.config import RunConfig
    from ptqbench.grid.plan import prepare

    grid = _GRIDS.get(cfg_json)
    if grid is None:
        _GRIDS.clear()
        grid = prepare(RunConfig.from_flat(**json.loads(cfg_json)), progress=None, log=lambda *a, **k: None, new_run_dir=False)
        got = grid.calib.hash
        if got != calib_hash:
            raise RuntimeError(f"the worker's calibration set {got} differs from the driver's {calib_hash}; "
                               "the runs folder must be shared by the driver and the workers")
        _GRIDS[cfg_json] = grid
    return grid


def worker_config(grid) -> str:
    """The config a worker prepares its grid from, as JSON (also the key of its grid cache)."""
    cfg = grid.cfg.to_dict()
    # The worker's grid must be the driver's: same run folder (cfg.name may be None = a fresh
    # timestamp) and the same device kind, hence the same dtype and calibration cache entry.
    cfg.update(name=grid.run_dir.name, device=grid.device.type, executor="local", address=None, force=False)
    return json.dumps(cfg, sort_keys=True)


def run_cell_task(cfg_json: str, calib_hash: str, cell, stored_file=None) -> dict:
    """Body of the Ray task (runs in a worker): one cell, returned as plain data. Never writes the store."""
    import ray
    import torch

    if ray.is_initialized():  # in a Ray task: use the task's share of CPUs, not every core of the node
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if cpus:  # none assigned: not a task (a direct call in a driver), keep torch's setting
            torch.set_num_threads(max(1, int(cpus)))
    t0 = time.perf_counter()
    try:
        from ptqbench.grid.cell import run_cell

        grid = _worker_grid(cfg_json, calib_hash)
        t0 = time.perf_counter()  # a cell's time is its own, as with the local executor
        result = run_cell(grid, cell, None, stored_file)
        return dict(ok=True, result=_plain(result), seconds=time.perf_counter() - t0)
    except Exception as e:  # recorded as a failed cell by the driver, never retried
        return dict(ok=False, error=one_line(e), detail=traceback.format_exc(limit=8), seconds=time.perf_counter() - t0)


class RayExecutor:
    def __init__(self, address: str | None = None, max_retries: int = MAX_RETRIES):
        self.address = address
        self.max_retries = max_retries

    def _connect(self, ray) -> bool:
        """Connect to Ray; True when this call started it (and so must shut it down)."""
        if ray.is_initialized():
            return False
        quiet = dict(logging_level=logging.WARNING, log_to_driver=False)
        if self.address:
            ray.init(address=self.address, **quiet)
        else:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance needs no token
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, **quiet)
        return True

    def run(self, grid, cells, started: Callable, finished: Callable, failed: Callable, progress=None,
            stored_file: Callable = lambda cell: None, log: Callable = print) -> None:
        ray = _import_ray()
        if not cells:
            return
        if grid.cfg.grid.schedule == "lockstep":
            log("[schedule] the ray executor runs every cell as its own task (cells); lockstep needs one process")
        cfg_json, calib_hash = worker_config(grid), grid.calib.hash
        resources = dict(num_gpus=1) if grid.device.type == "cuda" else dict(num_cpus=1)

        we_started = self._connect(ray)
        try:
            task = ray.remote(max_retries=self.max_retries, retry_exceptions=False, **resources)(run_cell_task)
            bar = progress.add_task("cells", total=len(cells)) if progress is not None else None
            pending = {}  # ObjectRef -> (cell, submit time)
            try:
                for cell in cells:
                    todo = started(cell)  # None: claimed by another live run, or done meanwhile
                    if todo is None:
                        if bar is not None:
                            progress.advance(bar)
                        continue
                    ref = task.options(name=f"ptqbench {todo.method} {todo.fmt}").remote(cfg_json, calib_hash, todo, stored_file(todo))
                    pending[ref] = (todo, time.perf_counter())
                while pending:
                    ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                    for ref in ready:
                        cell, t0 = pending.pop(ref)
                        self._report(ray, ref, cell, t0, finished, failed)
                        if bar is not None:
                            progress.advance(bar)
            except KeyboardInterrupt:
                for cell, t0 in pending.values():
                    failed(cell, "interrupted", "", time.perf_counter() - t0)
                raise
            finally:
                for ref in pending:  # interrupted, or a callback failed: stop the work nobody will record
                    try:
                        ray.cancel(ref, force=True)
                    except Exception:
                        pass
        finally:
            if we_started:
                ray.shutdown()

    @staticmethod
    def _report(ray, ref, cell, t0: float, finished: Callable, failed: Callable) -> None:
        try:
            out = ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # raised outside the task's own guard (e.g. unpickling)
            cause = e.cause if getattr(e, "cause", None) is not None else e
            failed(cell, one_line(cause), str(e), time.perf_counter() - t0)
            return
        except ray.exceptions.RayError as e:  # the worker died max_retries + 1 times, or its node did
            failed(cell, one_line(e), str(e), time.perf_counter() - t0)
            return
        if out["ok"]:
            finished(cell, out["result"], out["seconds"])
        else:
            failed(cell, out["error"], out["detail"], out["seconds"])
