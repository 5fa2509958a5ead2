"""Finding a cell's saved model from what a user names: a path, or a cell id in the results store.

The lookup reads the store, so it lives here in `grid`; `ptqbench.deploy.export` takes the path it
returns.
"""

from __future__ import annotations

from pathlib import Path

from ptqbench.deploy.export import CELL_FILE, cell_file
from ptqbench.errors import BadInput
from ptqbench.grid.store import ResultsStore


def resolve_cell(ref, runs_dir="runs") -> Path:
    """A cell to export: a path (a cell directory or its model.safetensors) or a cell id, or a unique
    prefix of one, from the store in `runs_dir`; the id's file is runs/<run_id>/cells/<cell_id>/, else
    the newest such file of any run."""
    p = Path(ref)
    if p.exists():
        return cell_file(p)
    runs = Path(runs_dir)
    if not (runs / "results.sqlite").is_file():
        raise BadInput(f"{ref!r} is neither a path nor a cell of a store (no {runs / 'results.sqlite'}); accepted: "
                       f"a cell directory, its {CELL_FILE}, or a cell id listed by the store in --runs")
    cells = [c for c in ResultsStore(runs, create=False).cells() if c["cell_id"].startswith(str(ref))]
    if len(cells) != 1:
        found = ", ".join(c["cell_id"] for c in cells[:5])
        raise BadInput(f"cell id {ref!r} matches {len(cells)} cells in {runs}{' (' + found + ')' if found else ''}; "
                       f"accepted: a unique cell id prefix, a cell directory or its {CELL_FILE}")
    cell = cells[0]
    run_id = (cell.get("key") or {}).get("run_id")
    candidates = [runs / run_id / "cells" / cell["cell_id"] / CELL_FILE] if run_id else []
    candidates += sorted(runs.glob(f"*/cells/{cell['cell_id']}/{CELL_FILE}"), key=lambda f: f.stat().st_mtime, reverse=True)
    for f in candidates:
        if f.is_file():
            return f
    raise BadInput(f"cell {cell['cell_id']} ({cell['method']} w{cell['bits']}, {cell['status']}) has no saved model "
                   f"under {runs}; accepted: a cell of a run with save-model on")
