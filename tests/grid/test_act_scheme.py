"""--act-scheme tensor (per-tensor static activations) through the grid: its own cell ids (weight-only and
per-token ids unchanged), scales saved and reloaded (a task scored later on the saved cell equals a fresh one),
its format label, its deployment (simulated, labelled) and the one-line refusals (int8dyn, export)."""

import copy
import dataclasses
import json
import sqlite3

import pytest
import torch
from typer.testing import CliRunner

from ptqbench import cli
from ptqbench.deploy.export_ct import export_compressed_tensors
from ptqbench.deploy.kernels import deploy, kernel_unsupported
from ptqbench.deploy.packing import load_quantized
from ptqbench.models.tiny import build_tiny

runner = CliRunner()
BASE = ["--model", "tiny:qwen2-vl", "--methods", "rtn,gptq", "--bits", "4", "--calib-n", "2", "--no-latency",
        "--device", "cpu"]
WEIGHT_ONLY_IDS = {"rtn": "b24a6d20b232e288", "gptq": "3a1f179a57437f5b"}  # as in test_act_bits.py
# per-token W4A8 ids computed before --act-scheme existed (same settings): they must stay these
TOKEN_W4A8_IDS = {"rtn": "7db076d2c8fcf842", "gptq": "c0c67e4495cf77a4"}


def run(*args):
    res = runner.invoke(cli.app, list(map(str, args)), catch_exceptions=False)
    return res.exit_code, res.output


def cells(runs):
    con = sqlite3.connect(runs / "results.sqlite")
    return {(m, o.get("act_bits", 16), o.get("act_scheme", "token")): cid
            for m, o, cid in ((m, json.loads(o), cid) for m, o, cid in con.execute("select method, method_options, cell_id from cells"))}


def test_static_cells_have_their_own_ids_and_deploy_labelled(tmp_path):
    code, out = run("run", *BASE, "--act-bits", "8,16", "--act-scheme", "tensor", "--runs", tmp_path, "--name", "s")
    assert code == 0, out
    assert "rtn w4a8t: done" in out and "rtn w4: done" in out
    code, out = run("run", *BASE, "--act-bits", "8", "--runs", tmp_path, "--name", "d")
    assert code == 0, out
    ids = cells(tmp_path)
    assert len(ids) == 6
    for m in ("rtn", "gptq"):
        assert ids[(m, 16, "token")] == WEIGHT_ONLY_IDS[m]  # weight-only cells ignore the scheme
        assert ids[(m, 8, "token")] == TOKEN_W4A8_IDS[m]
        assert ids[(m, 8, "tensor")] not in (WEIGHT_ONLY_IDS[m], TOKEN_W4A8_IDS[m])
    code, md = run("leaderboard", "--runs", tmp_path)
    assert code == 0 and "| rtn | W4A8t g32 |" in md and "| rtn | W4A8 g32 |" in md and "act_scheme" not in md
    path = tmp_path / "s" / "cells" / ids[("rtn", 8, "tensor")] / "model.safetensors"
    weights, _, _ = load_quantized(path)
    assert weights and all(qw.extras["act_scale"].dim() == 0 and float(qw.extras["act_scale"]) > 0 for qw in weights.values())
    summary = export_compressed_tensors(path, tmp_path / "ct")  # static input_activations (tests/deploy/test_export_ct.py)
    assert summary.act_bits == 8 and summary.layout == "int-quantized"
    # deployment: the saved weights carry act_bits only in the cell's identity; give them the static spec
    weights = {n: dataclasses.replace(qw, spec=dataclasses.replace(qw.spec, act_bits=8, act_scheme="tensor"))
               for n, qw in weights.items()}
    qw = next(iter(weights.values()))
    assert "per-tensor static" in kernel_unsupported(qw, "int8dyn", torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    model, _ = build_tiny("qwen2-vl")
    used = deploy(copy.deepcopy(model), weights, "auto", dtype=torch.float32)
    assert used and all(k.endswith("+fakeA8t") for k in used.values())


TASKS = ["--model", "tiny:qwen2-vl", "--methods", "rtn", "--bits", "4", "--calib-n", "2", "--no-latency", "--device", "cpu",
         "--eval-n", "4", "--act-bits", "8", "--act-scheme", "tensor"]


def test_a_static_task_scores_the_same_on_reloaded_weights(tmp_path):
    """A task added later is scored on the saved cell with its stored static scales installed again: the value
    a fresh run computes."""
    assert run("run", *TASKS, "--tasks", "synthvqa-nll", "--runs", tmp_path / "a")[0] == 0
    code, out = run("run", *TASKS, "--tasks", "synthvqa-nll,synthvqa", "--runs", tmp_path / "a")  # reload path
    assert code == 0, out
    assert run("run", *TASKS, "--tasks", "synthvqa-nll,synthvqa", "--runs", tmp_path / "b")[0] == 0  # fresh
    assert run("run", *TASKS[:-2], "--tasks", "synthvqa-nll", "--runs", tmp_path / "c")[0] == 0  # per token

    def values(runs):
        con = sqlite3.connect(runs / "results.sqlite")
        return {(t, m): v for t, m, v in con.execute(
            "select task, metric, value from results where task like 'synthvqa%' and method='rtn'")}

    a, b, c = values(tmp_path / "a"), values(tmp_path / "b"), values(tmp_path / "c")
    assert a == b and any(k[0] == "synthvqa" for k in a)
    assert any(a[k] != c[k] for k in c)  # the static quantizer is what was scored, not the per-token one
