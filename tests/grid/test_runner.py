"""`bench run` end to end on every family's tiny model: RTN and GPTQ, results in the store, resume."""

import sqlite3

import pytest
from typer.testing import CliRunner

from ptqbench import cli
from ptqbench.models.tiny import TINY_FAMILIES

runner = CliRunner()


def run(*args):
    res = runner.invoke(cli.app, ["run", *args], catch_exceptions=False)
    return res.exit_code, res.output


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_rtn_and_gptq_on_every_family(family, tmp_path):
    code, out = run("--model", f"tiny:{family}", "--methods", "rtn,gptq", "--bits", "3", "--calib-n", "4",
                    "--runs", str(tmp_path), "--name", "r", "--no-latency")
    assert code == 0, out
    con = sqlite3.connect(tmp_path / "results.sqlite")
    errs = dict(con.execute("select method, value from results where task='recon' and metric='final_rel_err'"))
    assert set(errs) == {"rtn", "gptq"} and 0 < errs["gptq"] < errs["rtn"], errs
    assert len(list((tmp_path / "r" / "cells").glob("*/model.safetensors"))) == 2


def test_vision_tower_and_resume(tmp_path):
    args = ("--model", "tiny:qwen2.5-vl", "--methods", "rtn,gptq", "--bits", "4", "--calib-n", "2", "--runs", str(tmp_path),
            "--quantize-vision", "--group-size", "16", "--no-save-model", "--no-latency")
    code, out = run(*args)
    assert code == 0, out
    con = sqlite3.connect(tmp_path / "results.sqlite")
    n_rows = con.execute("select count(*) from results").fetchone()[0]
    stamps = con.execute("select updated_at from results order by id").fetchall()
    code, out = run(*args)  # everything done: nothing recomputed, nothing lost
    assert code == 0 and out.count("already done") == 2
    assert con.execute("select count(*) from results").fetchone()[0] == n_rows
    assert con.execute("select updated_at from results order by id").fetchall() == stamps


def test_failing_cell_is_recorded_and_grid_goes_on(tmp_path, monkeypatch):
    from ptqbench.methods import gptq

    def broken(*a, **k):
        raise FloatingPointError("synthetic failure")

    monkeypatch.setattr(gptq, "solve_many", broken)
    code, out = run("--model", "tiny:llava", "--methods", "gptq,rtn", "--bits", "2,4", "--calib-n", "2",
                    "--runs", str(tmp_path), "--no-save-model", "--no-latency")
    assert code == 1
    con = sqlite3.connect(tmp_path / "results.sqlite")
    status = dict(((m, b), s) for m, b, s in con.execute("select method, bits, status from cells"))
    assert status == {("gptq", 2): "failed", ("gptq", 4): "failed", ("rtn", 2): "done", ("rtn", 4): "done"}
    assert "synthetic failure" in con.execute("select error from cells where method='gptq'").fetchone()[0]
    monkeypatch.undo()
    code, out = run("--model", "tiny:llava", "--methods", "gptq,rtn", "--bits", "2,4", "--calib-n", "2",
                    "--runs", str(tmp_path), "--no-save-model", "--no-latency")
    assert code == 0 and out.count("already done") == 2  # the failed cells are retried, done ones kept


def test_latency_rows_name_their_kernel(tmp_path):
    """Latency is timed once per format (full precision, W2, W4), not per method, and names its kernel."""
    code, out = run("--model", "tiny:qwen2-vl", "--methods", "rtn,gptq", "--bits", "2,4", "--calib-n", "2", "--runs", str(tmp_path),
                    "--no-save-model", "--latency-tokens", "4")
    assert code == 0, out
    con = sqlite3.connect(tmp_path / "results.sqlite")
    rows = {(m, b): (k, size, tok, n) for m, b, k, size, tok, n in con.execute(
        "select method, bits, kernel, model_bytes, decode_tok_s, n from results where metric = 'decode_tok_s'")}
    assert set(rows) == {("fp", 16), ("format", 2), ("format", 4)}  # one figure per format, whatever the methods
    assert rows[("fp", 16)][0] == "dense[bf16]"
    assert rows[("format", 4)][0] == "int4pack[bf16]" and rows[("format", 2)][0] == "dequant[bf16]"
    assert rows[("format", 2)][1] < rows[("format", 4)][1] < rows[("fp", 16)][1]  # measured from the held tensors
    assert all(v[2] and v[2] > 0 and v[3] >= 7 for v in rows.values())  # at least min_rounds interleaved repeats
    assert out.count("[latency] timing 3 format(s)") == 1


def test_seeds_give_one_calibration_set_each_and_a_spread(tmp_path):
    from ptqbench.leaderboard import leaderboard

    code, out = run("--model", "tiny:qwen2-vl", "--methods", "gptq", "--bits", "4", "--calib-n", "2", "--runs", str(tmp_path),
                    "--no-save-model", "--no-latency", "--tasks", "synthvqa-nll", "--eval-n", "4", "--seeds", "1,2")
    assert code == 0, out
    con = sqlite3.connect(tmp_path / "results.sqlite")
    hashes = {h for (h,) in con.execute("select calib_hash from cells where method = 'gptq'")}
    assert len(hashes) == 2  # a calibration set per seed
    assert con.execute("select count(*) from cells where method = 'fp'").fetchone()[0] == 1  # fp does not depend on it
    md = leaderboard(tmp_path, "md")
    spread = md.split("### Spread across calibration sets")[1].split("###")[0]
    assert "gptq" in spread and "(2 sets)" in spread
