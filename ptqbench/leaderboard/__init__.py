"""Results store and leaderboard: `bench leaderboard` reads <runs>/results.sqlite and renders it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ptqbench.errors import BadInput, one_of
from ptqbench.leaderboard.render import FORMATS, render
from ptqbench.grid.store import ResultsStore

__all__ = ["ResultsStore", "render", "leaderboard"]


def leaderboard(runs_dir="runs", fmt: str = "md", out=None) -> str:
    """Render the store in `runs_dir` as md/html/json; write it to `out` if given; return the text."""
    if fmt not in FORMATS:
        raise one_of("format", fmt, FORMATS)
    store = ResultsStore(runs_dir, create=False)
    rows, cells = store.rows(), store.cells()
    if not rows and not cells:
        raise BadInput(f"results store {store.path} holds no results yet; run `bench run` first")
    text = render(rows, fmt, cells=cells, units=store.units())
    if out is not None:
        _write_only(Path(out), text, store.path)
    return text


def _write_only(out: Path, text: str, db: Path) -> None:
    """Write `out` and nothing else: via a temporary file beside it, renamed over it at the end."""
    if out.is_dir():
        raise BadInput(f"--out {str(out)!r} is a folder; accepted: a file path")
    if out.resolve() in {Path(f"{db}{s}").resolve() for s in ("", "-wal", "-shm", "-journal")}:
        raise BadInput(f"--out {str(out)!r} is the results store itself; accepted: another file path")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; the page is the user's to share, as any file they write
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
