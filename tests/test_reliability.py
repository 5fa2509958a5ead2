"""Reliability of `bench run`: exact cell identity, failures that stay in their cell, resume after kill -9,
concurrent runs, and inputs that cannot run code. docs/reliability.md lists what is tried here.

Runs use tiny random-weight models: the figures are meaningless, their identity and bookkeeping are not."""

import json
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ptqbench import cli

runner = CliRunner()
BENCH = [sys.executable, "-m", "ptqbench.cli"]
BASE = ["--model", "tiny:qwen2-vl", "--calib-n", "2", "--tasks", "synthvqa", "--eval-n", "4", "--latency-tokens", "2"]


def run(*args, expect=0):
    res = runner.invoke(cli.app, ["run", *map(str, args)], catch_exceptions=False)
    assert res.exit_code == expect, res.output
    return res.output


def db(runs) -> sqlite3.Connection:
    con = sqlite3.connect(Path(runs) / "results.sqlite")
    con.row_factory = sqlite3.Row
    return con


def state(runs) -> dict:
    """Every stored number with the time it was written, and how often each cell and unit was attempted."""
    con = db(runs)
    rows = {(r["cell_id"], r["unit"], r["task"], r["metric"]): (r["value"], r["updated_at"])
            for r in con.execute("select * from results where status = 'ok'")}
    cells = {r["cell_id"]: (r["status"], r["attempts"]) for r in con.execute("select * from cells")}
    units = {(r["cell_id"], r["unit"]): (r["status"], r["attempts"]) for r in con.execute("select * from units")}
    return dict(rows=rows, cells=cells, units=units)


# ---- identity: every field that produced a number keys it ------------------------------------------
CELL_FIELDS = [  # flags that change the quantized weights: a new cell
    ("bits", ["--bits", "3"]),
    ("group size", ["--group-size", "16"]),
    ("sym", ["--sym"]),
    ("rounding convention", ["--grid", "gptq"]),
    ("calibration", ["--calib-n", "3"]),
    ("seed", ["--seed", "2"]),
    ("compute dtype", ["--dtype", "bfloat16"]),
    ("method option", ["-o", "gptq.act_order=true"]),
    ("vision quantization", ["--quantize-vision", "--group-size", "16"]),
    ("max blocks", ["--max-blocks", "1"]),
]
UNIT_FIELDS = [  # flags that change a score or a timing only: a new unit on the stored weights
    ("eval n", ["--eval-n", "6"], "eval"),
    ("new task", ["--tasks", "synthvqa,synthvqa-nll"], "eval"),
    ("latency tokens", ["--latency-tokens", "3"], "deploy"),
    ("latency batch", ["--latency-batch", "2"], "deploy"),
    ("kernel", ["--kernel", "dequant"], "deploy"),
    ("inference dtype", ["--infer-dtype", "float32"], "deploy"),
]


@pytest.fixture(scope="module")
def base_runs(tmp_path_factory):
    runs = tmp_path_factory.mktemp("identity") / "runs"
    run(*BASE, "--methods", "gptq", "--bits", "4", "--runs", runs)
    return runs


def _copy(runs: Path, tmp_path: Path) -> Path:
    import shutil

    dest = tmp_path / "runs"
    shutil.copytree(runs, dest)
    return dest


@pytest.mark.parametrize("what, flags", CELL_FIELDS, ids=[c[0] for c in CELL_FIELDS])
def test_a_cell_field_makes_a_new_cell(base_runs, tmp_path, what, flags):
    runs = _copy(base_runs, tmp_path)
    before = state(runs)
    out = run(*BASE, "--methods", "gptq", "--bits", "4", "--runs", runs, "--no-latency", *flags)
    after = state(runs)
    new = set(after["cells"]) - set(before["cells"])
    gptq_new = [c for c in new if db(runs).execute("select method from cells where cell_id=?", (c,)).fetchone()[0] == "gptq"]
    assert len(gptq_new) == 1, (what, out)  # computed afresh, not served from the stored gptq w4 cell
    assert all(after["rows"][k] == v for k, v in before["rows"].items())  # and nothing stored was touched


@pytest.mark.parametrize("what, flags, kind", UNIT_FIELDS, ids=[u[0] for u in UNIT_FIELDS])
def test_a_unit_field_adds_a_unit_without_requantizing(base_runs, tmp_path, what, flags, kind):
    runs = _copy(base_runs, tmp_path)
    before = state(runs)
    out = run(*BASE, "--methods", "gptq", "--bits", "4", "--runs", runs, *flags)
    after = state(runs)
    assert set(after["cells"]) == set(before["cells"]) and after["cells"] == before["cells"], out  # no re-quantization
    new_units = set(after["units"]) - set(before["units"])
    kinds = {r["kind"] for r in db(runs).execute("select kind, unit, cell_id from units")
             if (r["cell_id"], r["unit"]) in new_units}
    assert len(new_units) >= 2 and kinds == {kind}, (what, out)  # one new unit for fp and one for gptq w4
    assert all(after["rows"][k] == v for k, v in before["rows"].items())  # old numbers kept, not overwritten


def test_a_rerun_with_the_same_settings_computes_nothing(base_runs, tmp_path):
    runs = _copy(base_runs, tmp_path)
    before = state(runs)
    out = run(*BASE, "--methods", "gptq", "--bits", "4", "--runs", runs)
    assert out.count("already done") == 2 and state(runs) == before


def test_a_new_task_is_scored_on_the_stored_weights_exactly(base_runs, tmp_path):
    """The reloaded packed weights score exactly what the in-memory ones do."""
    runs = _copy(base_runs, tmp_path)
    run(*BASE, "--methods", "gptq", "--bits", "4", "--runs", runs, "--tasks", "synthvqa,synthvqa-nll", "--no-latency")
    fresh = tmp_path / "fresh"
    run(*BASE, "--methods", "gptq", "--bits", "4", "--runs", fresh, "--tasks", "synthvqa-nll", "--no-latency")
    q = "select value from results where method='gptq' and task='synthvqa-nll' and metric='nll'"
    assert db(runs).execute(q).fetchone()[0] == db(fresh).execute(q).fetchone()[0]


def test_other_weights_under_the_same_name_are_new_cells(tmp_path, monkeypatch):
    from ptqbench.engine import calibration as C

    args = ("--model", "tiny:qwen2-vl", "--methods", "rtn", "--bits", "3,4", "--calib-n", "2", "--runs", tmp_path,
            "--no-save-model", "--no-latency")
    run(*args)
    monkeypatch.setattr(C, "model_fingerprint", lambda model: "0123456789abcdef")  # as if retrained
    out = run(*args)
    assert "already done" not in out
    assert db(tmp_path).execute("select count(distinct cell_id) from results").fetchone()[0] == 4  # old kept, not served


# ---- failures stay in their cell ---------------------------------------------------------------------
def test_nan_weights_fail_their_cell_and_the_grid_goes_on(tmp_path, monkeypatch):
    from ptqbench.methods import rtn

    real = rtn.quantize_rtn

    def nan_rtn(w, spec):
        qw = real(w, spec)
        if spec.bits == 2:
            qw.scale[0, 0] = float("nan")
        return qw

    monkeypatch.setattr(rtn, "quantize_rtn", nan_rtn)
    out = run("--model", "tiny:qwen2-vl", "--methods", "rtn", "--bits", "2,4", "--calib-n", "2", "--runs", tmp_path,
              "--no-latency", expect=1)
    cells = {(r["bits"]): (r["status"], r["error"]) for r in db(tmp_path).execute("select * from cells")}
    assert cells[4][0] == "done" and cells[2][0] == "failed" and "non-finite" in cells[2][1], out
    assert "running" not in {s for s, _ in cells.values()}


@pytest.mark.parametrize("where", ["raise", "nan"])
def test_a_failing_task_keeps_the_cell_and_its_other_results(tmp_path, monkeypatch, where):
    from ptqbench.eval import tasks

    def broken(self, *a, **k):
        if where == "raise":
            raise RuntimeError("task exploded")
        return {"nll": tasks.Score(float("nan"), 4)}

    monkeypatch.setattr(tasks.SynthVQANLL, "scores", broken)
    out = run(*BASE, "--methods", "rtn", "--bits", "4", "--tasks", "synthvqa,synthvqa-nll", "--runs", tmp_path, expect=1)
    con = db(tmp_path)
    units = {(r["kind"], json.loads(r["key_json"]).get("task")): (r["status"], r["error"] or "")
             for r in con.execute("select * from units")}
    assert units[("eval", "synthvqa-nll")][0] == "failed" and units[("eval", "synthvqa")][0] == "done", out
    assert ("task exploded" if where == "raise" else "non-finite") in units[("eval", "synthvqa-nll")][1]
    assert {s for (kind, _), (s, _) in units.items() if kind == "deploy"} == {"done"}
    assert {r["status"] for r in con.execute("select status from cells")} == {"done", "pending"}  # fp and formats: never quantized
    assert "2 cell(s) failed" in out  # the task fails on full precision and on rtn w4 alike
    monkeypatch.undo()  # fixed: the rerun computes only the failed tasks
    before = state(tmp_path)
    out = run(*BASE, "--methods", "rtn", "--bits", "4", "--tasks", "synthvqa,synthvqa-nll", "--runs", tmp_path)
    after = state(tmp_path)
    assert after["cells"] == before["cells"] and all(after["rows"][k] == v for k, v in before["rows"].items())
    assert all(s == "done" for s, _ in after["units"].values())


def test_a_failing_latency_keeps_the_scores(tmp_path, monkeypatch):
    from ptqbench.deploy import latency

    real = latency.measure_inference

    def broken(model, *a, **k):  # the W4 format's kernel crashes; full precision still times
        if any(type(m).__name__ == "QuantLinear" for m in model.modules()):
            raise RuntimeError("kernel crashed")
        return real(model, *a, **k)

    monkeypatch.setattr(latency, "measure_inference", broken)
    out = run(*BASE, "--methods", "rtn", "--bits", "4", "--runs", tmp_path, expect=1)
    con = db(tmp_path)
    kinds = {(r["kind"], r["method"], r["status"]) for r in con.execute(
        "select u.kind, c.method, u.status from units u join cells c using (cell_id)")}
    assert kinds == {("eval", "fp", "done"), ("eval", "rtn", "done"), ("deploy", "fp", "done"), ("deploy", "format", "failed")}, out
    assert con.execute("select count(*) from results where task='synthvqa' and metric='acc'").fetchone()[0] == 2
    assert "kernel crashed" in out


# ---- kill -9 and resume ------------------------------------------------------------------------------
GRID = ["--model", "tiny:qwen2-vl", "--methods", "rtn,gptq,awq", "--bits", "2,3,4", "--calib-n", "4", "--no-latency",
        "--tasks", "synthvqa", "--eval-n", "4"]


def _spawn(runs, *extra, name=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    args = [*BENCH, "run", *GRID, "--runs", str(runs), *extra] + (["--name", name] if name else [])
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _wait_for(cond, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def _count(runs, sql) -> int:
    """Poll the store without creating it (a plain connect would leave an empty file behind)."""
    try:
        with closing(sqlite3.connect(f"file:{Path(runs) / 'results.sqlite'}?mode=ro", uri=True)) as con:
            return con.execute(sql).fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    runs = tmp_path_factory.mktemp("reference") / "runs"
    p = _spawn(runs)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    return {(r["method"], r["bits"], r["task"], r["metric"]): r["value"]
            for r in db(runs).execute("select * from results where status='ok' and task != 'deploy'")}


KILL_POINTS = {
    "after-calibration": lambda runs: any((runs / ".calib").glob("*.safetensors")),
    "mid-cell": lambda runs: _count(runs, "select count(*) from cells where status='running'") > 0
    and _count(runs, "select count(*) from cells where status='done'") >= 1,
    "after-three-cells": lambda runs: _count(runs, "select count(*) from cells where status='done'") >= 3,
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_9_then_rerun_loses_and_repeats_nothing(tmp_path, reference, point):
    runs = tmp_path / "runs"
    p = _spawn(runs)
    reached = _wait_for(lambda: KILL_POINTS[point](runs), p)
    assert reached, p.communicate()[0]
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    done_before = {}
    if (runs / "results.sqlite").exists():
        from ptqbench.grid.store import ResultsStore

        ResultsStore(runs)  # a store killed before its schema was written is completed, as the rerun would
        con = db(runs)
        done_before = {r["cell_id"]: r["finished_at"] for r in con.execute("select * from cells where status='done'")}
        # a cell whose process died is never shown as running
        from ptqbench.grid.store import ResultsStore

        assert "running" not in {c["status"] for c in ResultsStore(runs).cells()}
    p = _spawn(runs)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    con = db(runs)
    after = {r["cell_id"]: (r["finished_at"], r["attempts"]) for r in con.execute("select * from cells where status='done'")}
    assert all(after[c][0] == t for c, t in done_before.items())  # completed cells were not recomputed
    got = {(r["method"], r["bits"], r["task"], r["metric"]): r["value"]
           for r in con.execute("select * from results where status='ok'")}
    assert got == reference  # equal to an uninterrupted run


# ---- concurrency -------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 3])
def test_concurrent_runs_compute_each_cell_once(tmp_path, reference, n):
    runs = tmp_path / "runs"
    procs = [_spawn(runs) for _ in range(n)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * n, outs
    con = db(runs)
    attempts = [r[0] for r in con.execute("select attempts from cells where method != 'fp'")]
    assert len(attempts) == 9 and set(attempts) == {1}, outs  # each cell quantized exactly once
    assert {r[0] for r in con.execute("select attempts from units")} == {1}  # each score computed once
    starts = sum(o.count(": start (") for o in outs)
    assert starts == 10, outs  # 9 cells + full precision, started once in all
    got = {(r["method"], r["bits"], r["task"], r["metric"]): r["value"]
           for r in con.execute("select * from results where status='ok'")}
    assert got == reference
    dirs = [d for d in runs.iterdir() if d.is_dir() and not d.name.startswith(".")]
    assert len(dirs) == n  # a run folder each, even when started in the same second


# ---- inputs that cannot run code ---------------------------------------------------------------------
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_planted_pickle_in_the_calibration_cache_is_never_executed(tmp_path):
    runs = tmp_path / "runs"
    args = ("--model", "tiny:qwen2-vl", "--methods", "rtn", "--bits", "4", "--calib-n", "2", "--runs", runs, "--no-latency")
    run(*args)
    (cache,) = (runs / ".calib").glob("calib-*")
    marker = tmp_path / "pwned"
    cache.write_bytes(pickle.dumps({"batches": _Payload(marker)}))
    (runs / ".calib" / "calib-planted.pt").write_bytes(pickle.dumps(_Payload(marker)))
    out = run(*args, "--force")
    assert not marker.exists(), out
    assert cache.read_bytes()[:8] != pickle.dumps(0)[:8]  # recaptured in place
    assert sum("calibration cache" in ln for ln in out.splitlines()) == 1, out  # one warning line


@pytest.mark.parametrize("name", ["../x", "/tmp/abs", "a/b", "..", ".", "x" * 101])
def test_name_cannot_escape_the_runs_folder(tmp_path, name):
    res = runner.invoke(cli.app, ["run", "--model", "tiny:qwen2-vl", "--methods", "rtn", "--runs", str(tmp_path / "runs"),
                                  "--name", name])
    assert res.exit_code != 0 and not (tmp_path / "runs").exists() and not (tmp_path / "x").exists()


def test_logs_have_a_line_per_cell_and_a_whole_summary(tmp_path):
    p = subprocess.run([*BENCH, "run", "--model", "tiny:qwen2-vl", "--methods", "rtn,gptq", "--bits", "3,4",
                        "--calib-n", "2", "--runs", str(tmp_path), "--latency-tokens", "2", "--tasks", "synthvqa",
                        "--eval-n", "4"], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, COLUMNS="80"))
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert out.count(": start (") == 5 and out.count(" left for ") == 5, out
    assert "capture calibration" not in out and "synthvqa ━" not in out  # no progress bars in a log
    header = next(ln for ln in out.splitlines() if "method" in ln and "bits" in ln)
    for column in ("synthvqa acc", "deploy decode_tok_s", "final_rel_err", "synthvqa acc spatial", "linear_rel_err vision"):
        assert column in header, header  # every metric, no column cut at 80 characters
    assert "…" not in out
