"""Executors run the pending cells of a grid; the driver's callbacks claim cells and write the store.

`local` (default) runs cells in this process: in lockstep passes (grid/lockstep.py, `--schedule lockstep`,
the default) or one after another (`--schedule cells`). Others (e.g. `ray`) run them
elsewhere and stream results back; every executor reports through the same three callbacks, so the
store, resume and failure handling are the same whatever runs the cells.
"""

from __future__ import annotations

from typing import Callable

from ptqbench.config import EXECUTORS
from ptqbench.errors import BadInput, one_of


class LocalExecutor:
    def run(self, grid, cells, started: Callable, finished: Callable, failed: Callable, progress=None,
            stored_file: Callable = lambda cell: None, log: Callable = print) -> None:
        from ptqbench.grid.lockstep import run_alone, run_lockstep

        if grid.cfg.grid.schedule == "lockstep":
            return run_lockstep(grid, cells, started, finished, failed, progress, stored_file, log)

        for cell in cells:
            todo = started(cell)  # None: claimed by another live run, or done meanwhile
            if todo is not None:
                run_alone(grid, todo, progress, stored_file, finished, failed)


def get_executor(name: str, address: str | None = None):
    if name == "local":
        if address is not None:
            raise BadInput(f"address {address!r} is only used by the ray executor; accepted: --executor ray with --address, or no --address")
        return LocalExecutor()
    if name == "ray":
        from ptqbench.grid.ray_executor import RayExecutor

        return RayExecutor(address=address)
    raise one_of("executor", name, EXECUTORS)
