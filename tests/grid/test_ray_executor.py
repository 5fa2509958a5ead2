"""The `ray` executor on a local Ray instance: a worker killed mid-cell, a driver killed mid-grid.

How a worker is killed without a test hook in the product code: the Ray instance these tests start
carries a job-level runtime_env with Ray's own `worker_process_setup_hook` set to `die_once_hook`
below (this file is put on the workers' PYTHONPATH for that), and an env var naming the cell to
kill. The hook runs in every worker process of this test's job as it starts, and wraps the method's
`quantize_block`: the first attempt of that cell to reach block 1 (so mid-cell, after block 0 was
quantized) creates a marker file and `os._exit(1)`s, as a crashed or OOM-killed worker would. The
retry finds the marker and runs through. Other jobs on the instance (the subprocess driver below)
have no such runtime_env, so the hook cannot touch them.
"""

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'ptqbench[ray]')")

from ptqbench.config import RunConfig  # noqa: E402
from ptqbench.grid.runner import run_grid  # noqa: E402

HERE = Path(__file__).resolve().parent
DIE_ENV = "PTQBENCH_TEST_DIE_ONCE"  # "method:bits:marker-path"
REPO = HERE.parent.parent


def die_once_hook():
    """Ray worker setup hook: the first attempt of cell (method, bits) in $PTQBENCH_TEST_DIE_ONCE dies at block 1."""
    target = os.environ.get(DIE_ENV)
    if not target:
        return
    method, bits, marker = target.split(":", 2)
    from ptqbench.methods import get_method

    cls = get_method(method)
    original = cls.quantize_block

    def quantize_block(self, block):
        if self.spec.bits == int(bits):
            if block.index == 0:
                with open(marker + ".attempts", "a") as f:
                    f.write(f"{os.getpid()}\n")
            if block.index == 1:
                try:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    pass  # a retry: run through
                else:
                    os._exit(1)  # no cleanup, no exception: the worker process is gone
        return original(self, block)

    cls.quantize_block = quantize_block


def grid_config(runs, **kw) -> RunConfig:
    base = dict(model="tiny:qwen2-vl", methods=["rtn", "gptq"], bits=[2, 4], calib_n=2, runs=str(runs),
                save_model=False, device="cpu", executor="ray", latency=False)
    return RunConfig.from_flat(**{**base, **kw})


def values(runs) -> dict:
    con = sqlite3.connect(Path(runs) / "results.sqlite")
    return {(m, b, t, k): v for m, b, t, k, v in con.execute("select method, bits, task, metric, value from results")}


def cells(runs) -> dict:
    con = sqlite3.connect(Path(runs) / "results.sqlite")
    return {(m, b): (s, a) for m, b, s, a in con.execute("select method, bits, status, attempts from cells")}


def test_without_ray_is_a_bad_input(monkeypatch):
    from ptqbench.errors import BadInput
    from ptqbench.grid.executors import get_executor

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(BadInput, match=r"executor 'ray' needs Ray: pip install 'ptqbench\[ray\]'"):
        get_executor("ray").run(None, [], None, None, None)


def test_task_returns_plain_data_and_errors_as_data(tmp_path):
    """The task body, called in this process: a cell comes back as JSON-plain data; an error comes back
    as a one-line message and a traceback, never raised (so Ray does not retry it)."""
    from ptqbench.grid import ray_executor as rx
    from ptqbench.grid.plan import plan, prepare

    grid = prepare(grid_config(tmp_path, bits=[2], methods=["rtn"]), log=lambda *a: None)
    cfg_json, (cell,) = rx.worker_config(grid), plan(grid)
    try:
        out = rx.run_cell_task(cfg_json, "not-the-driver-hash", cell)
        assert not out["ok"] and "\n" not in out["error"]
        assert out["error"].startswith("RuntimeError: the worker's calibration set") and "Traceback" in out["detail"]
        out = rx.run_cell_task(cfg_json, grid.manifest["content_hash"], cell)
        assert out["ok"] and json.loads(json.dumps(out, allow_nan=False)) == out  # nothing but JSON types
        quant = out["result"]["quant"]
        assert {r["task"] for r in quant["rows"]} == {"recon"} and quant["artifacts"]["diagnostics"]["linears"]
    finally:
        rx._GRIDS.clear()


def test_dead_worker_and_remote_error_become_failed_cells():
    from ray.exceptions import RayTaskError, WorkerCrashedError

    from ptqbench.grid.ray_executor import RayExecutor

    class FakeRay:
        exceptions = ray.exceptions

        def __init__(self, error):
            self.error = error

        def get(self, ref):
            raise self.error

    got = []
    fail = lambda cell, error, detail, s: got.append((cell, error, detail))  # noqa: E731
    RayExecutor._report(FakeRay(WorkerCrashedError()), None, "c1", 0.0, None, fail)
    remote = RayTaskError("run_cell_task", "Traceback ...\nValueError: bad\nthing", ValueError("bad\nthing"))
    RayExecutor._report(FakeRay(remote), None, "c2", 0.0, None, fail)
    assert got[0][0] == "c1" and got[0][1].startswith("WorkerCrashedError: ") and "\n" not in got[0][1]
    assert got[1][:2] == ("c2", "ValueError: bad thing") and "ValueError: bad" in got[1][2]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local Ray instance (2 CPUs) whose workers, for this test process's job only, run die_once_hook."""
    marker = tmp_path_factory.mktemp("die") / "gptq-w4-died"
    env_vars = {DIE_ENV: f"gptq:4:{marker}", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", os.environ.get("RAY_AUTH_MODE", "disabled"))
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        if ray.is_initialized():
            ray.shutdown()
        # num_workers_soft_limit: keep this job's idle workers (and their loaded grid) alive while the
        # subprocess driver's job has workers of its own; Ray would otherwise reap them down to num_cpus.
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                 object_store_memory=100 * 2**20,  # results are small; do not reserve 30% of RAM
                 runtime_env={"env_vars": env_vars, "worker_process_setup_hook": "test_ray_executor.die_once_hook"},
                 _system_config={"num_workers_soft_limit": 6})
        try:
            yield dict(address=ray.get_runtime_context().gcs_address, marker=marker)
        finally:
            ray.shutdown()


def test_worker_killed_mid_cell_is_retried(ray_cluster, tmp_path):
    import torch

    # The reference: the same grid on the local executor, single-threaded like the Ray workers.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_grid(grid_config(tmp_path / "local", executor="local"), log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    expected = values(tmp_path / "local")
    assert len({k[:2] for k in expected}) == 4

    runs = tmp_path / "ray"
    summary = run_grid(grid_config(runs), log=lambda *a: None)
    marker = ray_cluster["marker"]
    assert marker.exists(), "the hook never killed the gptq w4 worker"
    pids = Path(str(marker) + ".attempts").read_text().split()
    assert len(pids) == 2 and pids[0] != pids[1], pids  # died in one worker, finished in another
    assert sorted((o.method, o.bits, o.status) for o in summary.cells) == [
        ("gptq", 2, "done"), ("gptq", 4, "done"), ("rtn", 2, "done"), ("rtn", 4, "done")]
    # Every cell done, started once by the driver (the retry is Ray's, not a second start).
    assert cells(runs) == {(m, b): ("done", 1) for m in ("rtn", "gptq") for b in (2, 4)}
    assert values(runs) == expected  # same rows, same values (bit for bit) as the local executor

    con = sqlite3.connect(runs / "results.sqlite")
    stamps = con.execute("select id, updated_at from results order by id").fetchall()
    logs = []
    summary = run_grid(grid_config(runs), log=logs.append)  # resume: all done, nothing submitted
    assert {o.status for o in summary.cells} == {"cached"} and sum("already done" in m for m in logs) == 4
    assert con.execute("select id, updated_at from results order by id").fetchall() == stamps
    assert cells(runs) == {(m, b): ("done", 1) for m in ("rtn", "gptq") for b in (2, 4)}


DRIVER = """
import sys
from ptqbench.config import RunConfig
from ptqbench.grid.runner import run_grid
run_grid(RunConfig.from_flat(**__import__("json").loads(sys.argv[1])))
"""


def test_killed_driver_resumes(ray_cluster, tmp_path):
    """A driver (another process, joining the Ray instance by address) is SIGKILLed once its first cell is
    stored; the next run keeps the stored cells untouched and runs the rest."""
    runs = tmp_path / "runs"
    cfg = grid_config(runs, bits=[2, 3], address=ray_cluster["address"])  # gptq w4 (the hook's target) not in it
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"), OMP_NUM_THREADS="1")
    log = tmp_path / "driver.log"  # a file, not a pipe nobody reads
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(cfg.to_dict())], env=env, cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    done = []
    try:
        deadline = time.monotonic() + 150
        while not done:
            assert proc.poll() is None, "the driver ended before any cell was stored:\n" + log.read_text()
            assert time.monotonic() < deadline, "no cell stored in time:\n" + log.read_text()
            time.sleep(0.2)
            if (runs / "results.sqlite").exists():
                try:
                    done = [k for k, (s, _) in cells(runs).items() if s == "done"]
                except sqlite3.OperationalError:  # the schema is being created
                    pass
        proc.kill()  # SIGKILL: no cleanup, no atexit, no ray.shutdown
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything the driver left in its own session
        except ProcessLookupError:
            pass

    con = sqlite3.connect(runs / "results.sqlite")
    at_kill = cells(runs)
    stored = {k for k, (s, _) in at_kill.items() if s == "done"}
    assert stored and len(stored) < 4, at_kill  # killed mid-grid
    assert {k: s for k, (s, _) in at_kill.items() if k not in stored} == {  # submitted, never finished
        (m, b): "running" for m in ("rtn", "gptq") for b in (2, 3) if (m, b) not in stored}
    stamps = {(m, b, t, k): u for m, b, t, k, u in con.execute(
        "select method, bits, task, metric, updated_at from results")}

    logs = []
    summary = run_grid(grid_config(runs, bits=[2, 3]), log=logs.append)  # this process's driver, same instance
    assert sum("already done" in m for m in logs) == len(stored)
    assert {(o.method, o.bits) for o in summary.cells if o.status == "cached"} == stored
    after = cells(runs)
    assert {k: s for k, (s, _) in after.items()} == {(m, b): "done" for m in ("rtn", "gptq") for b in (2, 3)}
    for k in at_kill:  # the stored cells were not started again, the others once more
        assert after[k] == ("done", at_kill[k][1] + (k not in stored)), (k, at_kill[k], after[k])
    now = {(m, b, t, k): u for m, b, t, k, u in con.execute(
        "select method, bits, task, metric, updated_at from results")}
    assert {k: u for k, u in now.items() if k[:2] in stored} == {k: u for k, u in stamps.items() if k[:2] in stored}
    assert len({k[:2] for k in now}) == 4
