"""The lockstep schedule: identical results to one cell at a time, what it shares, chunks, failures, resume."""

import copy
import sqlite3

import pytest
import torch
from typer.testing import CliRunner

from ptqbench import cli
from ptqbench.engine.blockwise import Job, quantize_model, quantize_models
from ptqbench.grid import lockstep
from ptqbench.grid.perf import digest
from ptqbench.methods import QuantSpec, get_method
from ptqbench.methods import mbq as mbq_module
from ptqbench.methods import rtn as rtn_module
from ptqbench.methods.base import Together
from ptqbench.models.adapters import adapter_for

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
METHODS = ("rtn", "gptq", "gptaq", "awq", "mbq", "vlmq", "smoothquant")


def _solo(model, calib, method) -> str:
    m = copy.deepcopy(model)
    job = Job(m, method)
    job.quantized, job.diag, job.info = (lambda r: (r.quantized, r.diagnostics, r.method_info))(
        quantize_model(m, adapter_for(m), calib, method))
    return digest(job)


@pytest.mark.parametrize("memo_bytes", [2**30, 200_000])  # every shared value kept; none fits
def test_every_method_at_two_widths_is_identical_in_lockstep(tiny_qwen, tiny_calib, memo_bytes, monkeypatch):
    from ptqbench.engine import blockwise

    model = tiny_qwen[0]
    specs = [QuantSpec(bits=b, group_size=32) for b in (2, 4)] + [QuantSpec(bits=4, group_size=32, act_bits=8)]
    pairs = [(name, spec) for spec in specs for name in METHODS]
    solo = [_solo(model, tiny_calib, get_method(n)(s)) for n, s in pairs]
    hits = []
    real = blockwise.SharedBlock.memo

    def counted(self, key, compute):
        hits.append(key in self._memo)
        return real(self, key, compute)

    monkeypatch.setattr(blockwise.SharedBlock, "memo", counted)
    jobs = [Job(copy.deepcopy(model), get_method(n)(s)) for n, s in pairs]
    quantize_models(jobs, tiny_calib, memo={}, memo_bytes=memo_bytes)
    assert [j.error for j in jobs] == [None] * len(jobs)
    assert [digest(j) for j in jobs] == solo
    assert len(set(solo)) == len(solo)  # the digests do tell the cells apart
    if memo_bytes > 2**20:  # AWQ and MBQ at one format share their search candidates: most asks are answered
        assert sum(hits) >= len(hits) / 2, (sum(hits), len(hits))


def test_the_gradient_pass_runs_once_per_grid(tiny_qwen, tiny_calib, monkeypatch):
    calls = []
    real = mbq_module.modality_gradients
    monkeypatch.setattr(mbq_module, "modality_gradients", lambda run, *a: calls.append(1) or real(run, *a))
    memo: dict = {}
    for bits in ((2, 3), (4,)):  # two passes (chunks) of one grid share it too
        jobs = [Job(copy.deepcopy(tiny_qwen[0]), get_method("mbq")(QuantSpec(bits=b, group_size=32))) for b in bits]
        quantize_models(jobs, tiny_calib, memo=memo, max_blocks=1)
    assert len(calls) == 1
    jobs = [Job(copy.deepcopy(tiny_qwen[0]), get_method("mbq")(QuantSpec(bits=b, group_size=32))) for b in (2, 4)]
    quantize_models(jobs, tiny_calib, max_blocks=1)  # no memo: each cell computes its own
    assert len(calls) == 3


def test_a_failing_cell_leaves_the_pass_and_the_others_are_unchanged(tiny_qwen, tiny_calib, monkeypatch):
    from ptqbench.methods import rtn

    class Breaks(rtn.RTN):
        def quantize_block(self, block):
            if block.index == 1:
                raise FloatingPointError("synthetic failure in block 1")
            super().quantize_block(block)

    spec = QuantSpec(bits=3, group_size=32)
    want = _solo(tiny_qwen[0], tiny_calib, get_method("gptq")(spec))
    jobs = [Job(copy.deepcopy(tiny_qwen[0]), Breaks(spec)), Job(copy.deepcopy(tiny_qwen[0]), get_method("gptq")(spec))]
    quantize_models(jobs, tiny_calib, memo={})
    assert "synthetic failure in block 1" in str(jobs[0].error)
    assert jobs[1].error is None and digest(jobs[1]) == want


def test_chunks_follow_the_budget():
    fp = lockstep.Footprint(stream=50, model=400, shared=500, result=50, work=2000)
    assert fp.per_cell == 1000 and fp.fixed == 2500  # per cell: its tensors, doubled for the allocator's slack  # one cell's block work is counted once: cells take turns
    # cells take at most half of what the budget leaves after the fixed part; shared values keep the rest
    assert lockstep.chunk_size(fp, 2500 + 2 * 3 * 1000) == 3
    assert lockstep.chunk_size(fp, 2500 + 2 * 3 * 1000 - 1) == 2
    assert lockstep.chunk_size(fp, 10) == 1  # even one cell over the budget: one at a time
    plan = lockstep.PassPlan([], fp, 2500 + 3 * 1000 + 600)
    assert plan.memo_bytes(3) == 150  # shared values and waiting work: a quarter each, counted twice
    assert 4 * plan.memo_bytes(3) + fp.fixed + 3 * fp.per_cell <= plan.budget


def test_the_footprint_counts_quantized_weights_and_the_block_work():
    from torch import nn

    lin = nn.Linear(128, 8)
    assert lockstep._result_bytes([lin], 64) == 8 * 128 + 8 * 2 * 8 + 128 * 4  # codes, scale+zero per group, g_idx
    assert lockstep._result_bytes([lin], -1) == 8 * 128 + 8 * 1 * 8 + 128 * 4  # per channel: one group per row

    class Batch:
        def __init__(self, b, t, d):
            self.hidden = torch.zeros(b, t, d)

    linears = {"a": nn.Linear(64, 256), "b": nn.Linear(256, 64)}
    small = lockstep.work_bytes(linears, 2 * 64 * 256, [Batch(2, 16, 64)], heads=4)
    assert small > 2 * 4 * (4 * 2 * 64 * 256) + 96 * 2**20  # at least the block's copies, doubled, and the slack
    assert lockstep.work_bytes(linears, 2 * 64 * 256, [Batch(2, 16, 64)] * 4, heads=4) > small  # more tokens
    assert lockstep.work_bytes(linears, 2 * 64 * 256, [Batch(2, 64, 64)], heads=4) > small  # longer sequences


def _run(*args):
    res = runner.invoke(cli.app, ["run", *args], catch_exceptions=False)
    return res.exit_code, res.output


def _recon(path):
    con = sqlite3.connect(path / "results.sqlite")
    return sorted(con.execute("select method, bits, metric, value from results where task='recon'"))


def test_both_schedules_store_the_same_numbers_and_the_log_says_how_cells_were_grouped(tmp_path):
    common = ("--model", "tiny:qwen2-vl", "--methods", "rtn,gptq,mbq", "--bits", "2,4", "--calib-n", "4", "--no-latency")
    code, out = _run(*common, "--runs", str(tmp_path / "a"), "--memory-budget", "1GiB", "--profile")
    assert code == 0, out
    assert "[schedule] lockstep: 6 cell(s) to quantize in 1 pass(es) of up to" in out and "budget 1.00 GiB" in out
    assert "[profile] quantization" in out
    code, out = _run(*common, "--runs", str(tmp_path / "b"), "--schedule", "cells")
    assert code == 0, out
    assert "[schedule]" not in out
    assert _recon(tmp_path / "a") == _recon(tmp_path / "b") != []
    code, out = _run(*common, "--runs", str(tmp_path / "c"), "--memory-budget", "1KiB")
    assert code == 0 and "in 6 pass(es) of up to 1" in out and "even one cell exceeds the budget" in out, out
    assert _recon(tmp_path / "c") == _recon(tmp_path / "a")


def test_an_interrupted_pass_recomputes_only_its_unfinished_cells(tmp_path, monkeypatch):
    args = ("--model", "tiny:qwen2-vl", "--methods", "rtn", "--bits", "2,3,4", "--calib-n", "2", "--no-latency",
            "--runs", str(tmp_path))
    real = lockstep.record_quantization
    seen = []

    def interrupt_second(grid, cell, *a, **k):
        seen.append(cell.bits)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(grid, cell, *a, **k)

    from ptqbench.config import RunConfig
    from ptqbench.grid.runner import run_grid

    monkeypatch.setattr(lockstep, "record_quantization", interrupt_second)
    cfg = RunConfig.from_flat(model="tiny:qwen2-vl", methods=["rtn"], bits=[2, 3, 4], calib_n=2, latency=False,
                              runs=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        run_grid(cfg, log=lambda *a: None)
    monkeypatch.undo()
    con = sqlite3.connect(tmp_path / "results.sqlite")
    assert dict(con.execute("select bits, status from cells")) == {2: "done", 3: "failed", 4: "failed"}
    code, out = _run(*args)
    assert code == 0, out
    assert "rtn w2: already done" in out and "[schedule] lockstep: 2 cell(s) to quantize" in out
    assert dict(con.execute("select bits, status from cells")) == {2: "done", 3: "done", 4: "done"}


def test_profile_json_in_every_run_folder(tmp_path):
    import json

    code, out = _run("--model", "tiny:llava", "--methods", "rtn", "--bits", "4", "--calib-n", "2", "--no-latency",
                     "--runs", str(tmp_path), "--name", "r")
    assert code == 0 and "[profile]" not in out
    prof = json.loads((tmp_path / "r" / "profile.json").read_text())
    assert {"model load", "calibration", "quantization", "saving", "other"} <= set(prof["phases"])
    assert abs(sum(p["seconds"] for p in prof["phases"].values()) - prof["total_seconds"]) < 0.1


def test_bench_perf_reports_identical_results_and_a_ratio(tmp_path):
    import json

    res = runner.invoke(cli.app, ["perf", "--model", "tiny:qwen2-vl", "--methods", "rtn,awq", "--bits", "3", "--calib-n", "2",
                                  "--no-latency", "--repeats", "1", "--json", str(tmp_path / "p.json"),
                                  "--runs", str(tmp_path / "runs")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "p.json").read_text())
    assert got["identical"] is True and got["cells"] == 2 and got["ratio"] > 0
    assert "lockstep / cells =" in res.output and not (tmp_path / "runs" / "results.sqlite").exists()


class _Piece(Together):
    """A piece of work run together (methods.base.Together): doubles its value, or fails."""

    calls: list = []

    def __init__(self, value, fail=False):
        self.value, self.fail = value, fail

    def key(self):
        return ("piece",)

    def nbytes(self):
        return 10

    @classmethod
    def run_together(cls, items):
        cls.calls.append(len(items))
        return [ValueError("bad piece") if p.fail else 2 * p.value for p in items]


class _HandsOver(rtn_module.RTN):
    fail = False

    def quantize_block(self, block):
        got = yield [_Piece(1, self.fail), _Piece(2)]
        assert got == [2, 4]
        super().quantize_block(block)


class _HandsOverBadly(_HandsOver):
    fail = True


@pytest.mark.parametrize("memo_bytes", [1000, 0])
def test_work_handed_over_runs_together_within_the_allowance(tiny_qwen, tiny_calib, memo_bytes):
    """A generator method's pieces: those of every cell of a pass in one call when the allowance holds them,
    one cell's at a time when it does not; a failing piece fails its cell only; results as a plain method's."""
    spec = QuantSpec(bits=3, group_size=32)
    _Piece.calls = []
    want = _solo(tiny_qwen[0], tiny_calib, get_method("rtn")(spec))
    jobs = [Job(copy.deepcopy(tiny_qwen[0]), m(spec)) for m in (_HandsOver, _HandsOverBadly, _HandsOver)]
    quantize_models(jobs, tiny_calib, memo={}, memo_bytes=memo_bytes)
    assert "bad piece" in str(jobs[1].error)
    assert jobs[0].error is None and jobs[2].error is None
    assert digest(jobs[0]) == want and digest(jobs[2]) == want
    n_blocks = len(adapter_for(tiny_qwen[0]).decoder_layers())
    # block 0: all three cells' pieces in one call (or each cell's alone); later blocks: the two cells left
    assert _Piece.calls == ([6] + [4] * (n_blocks - 1) if memo_bytes else [2] * (2 * n_blocks + 1))


class _ShortPiece(_Piece):
    @classmethod
    def run_together(cls, items):
        return [2 * p.value for p in items][:-1]  # one result missing


class _HandsOverShort(rtn_module.RTN):
    def quantize_block(self, block):
        yield [_ShortPiece(1), _ShortPiece(2)]
        super().quantize_block(block)


def test_a_run_together_that_loses_a_result_fails_its_cells_loudly(tiny_qwen, tiny_calib):
    spec = QuantSpec(bits=3, group_size=32)
    jobs = [Job(copy.deepcopy(tiny_qwen[0]), _HandsOverShort(spec)), Job(copy.deepcopy(tiny_qwen[0]), get_method("rtn")(spec))]
    quantize_models(jobs, tiny_calib, memo={}, memo_bytes=1000)
    assert "returned 1 results for 2 pieces" in str(jobs[0].error)
    assert jobs[1].error is None
