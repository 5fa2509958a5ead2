"""Before a run does any work: every input checked (nothing loaded, nothing written), then the run folder.

Bad input is one BadInput line naming the value and what is accepted; the CLI turns it into exit 2.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

from ptqbench.config import RunConfig
from ptqbench.errors import BadInput
from ptqbench.models.sources import check_model_source, resolve_device
from ptqbench.methods import QuantSpec, get_method

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def probe_writable(folder: Path, what: str) -> None:
    """The nearest existing folder of `folder` must take a new file (a real write: root ignores modes)."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise BadInput(f"{what} {str(folder)!r} lies under a file ({str(probe)!r}); accepted: a writable folder")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".ptqbench-probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise BadInput(f"{what} {str(folder)!r} is not writable ({e.strerror or e}); accepted: a writable folder") from None


def validate_inputs(cfg: RunConfig) -> dict:
    """Check every input that can be checked without the model; returns the method classes.
    Writes nothing (a probe file in the runs folder is created and removed at once)."""
    from ptqbench.eval.registry import get_task
    from ptqbench.engine.calibration import check_source
    from ptqbench.grid.store import DB_NAME, ResultsStore

    if cfg.grid.name is not None and (not NAME_RE.match(cfg.grid.name) or cfg.grid.name in (".", "..")):
        raise BadInput(f"name {cfg.grid.name!r} is not accepted; accepted: a plain folder name of letters, digits, '.', '_' "
                       "and '-' (no path, at most 100 characters)")
    runs = Path(cfg.grid.runs)
    if runs.exists() and not runs.is_dir():
        raise BadInput(f"runs {str(runs)!r} is a file; accepted: a folder (new or written by bench run)")
    probe_writable(runs, "runs folder")
    if (runs / DB_NAME).exists():
        ResultsStore(runs, create=False).check_writable()  # refuses a foreign, damaged or read-only store
    methods = {m: get_method(m) for m in cfg.method_list()}
    q, c = cfg.quant, cfg.calib
    for m, cls in methods.items():  # options of every named method, at every format (a method may refuse one)
        for b in q.bits:
            for a in q.act_bits:
                cls(QuantSpec(bits=b, group_size=q.group_size if q.group_size is not None else 128, sym=q.sym,
                              grid=q.rounding, act_bits=a, act_scheme=q.act_scheme), **q.options.get(m, {}))
    device = resolve_device(cfg.model.device)
    check_model_source(cfg.model.source, allow_pickle=cfg.model.allow_pickle)
    check_source(c.source, c.n, c.seed, c.image_root)
    for t in cfg.eval.tasks or []:
        get_task(t)
    return methods, device


def make_run_dir(runs: Path, name: str | None) -> Path:
    """A named folder is reused (resuming that run); a default one is unique even within one second."""
    runs.mkdir(parents=True, exist_ok=True)
    if name is not None:
        (runs / name).mkdir(exist_ok=True)
        return runs / name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1, 10_000):
        d = runs / (stamp if i == 1 else f"{stamp}-{i}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run folder name for {stamp} in {runs}")


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
