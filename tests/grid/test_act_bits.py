"""Weight-activation formats as a grid axis (--act-bits): weight-only cells keep their identity and weights,
W4A8 cells are their own, the leaderboard names them, evaluation runs with the activation quantizer (on
fresh and on reloaded weights alike), and latency is measured per W/A format with its kernel named."""

import copy
import functools
import hashlib
import json
import sqlite3

import pytest
import torch
from typer.testing import CliRunner

from ptqbench import cli
from ptqbench.deploy.export import export_gptq
from ptqbench.deploy.packing import load_quantized
from ptqbench.errors import BadInput
from ptqbench.engine.blockwise import quantize_model
from ptqbench.grid import formats
from ptqbench.grid.cell import install_cell_activations
from ptqbench.grid.plan import Cell
from ptqbench.methods import QuantSpec, all_methods, get_method
from ptqbench.models.adapters import adapter_for

runner = CliRunner()
# Computed before --act-bits existed (tiny:qwen2-vl, rtn/gptq w4 g32, calib-n 2, seed 1, cpu, float32): a
# weight-only cell's id and RTN's weights must stay exactly these, so every stored cell is reused as it is.
WEIGHT_ONLY_IDS = {"rtn": "b24a6d20b232e288", "gptq": "3a1f179a57437f5b"}
RTN_W4_WEIGHTS = "0240b0aaeb58010f"


def run(*args):
    res = runner.invoke(cli.app, list(map(str, args)), catch_exceptions=False)
    return res.exit_code, res.output


def weights_digest(path) -> str:
    weights, _, _ = load_quantized(path)
    h = hashlib.sha256()
    for n in sorted(weights):
        h.update(n.encode())
        h.update(weights[n].dequantize().numpy().tobytes())
    return h.hexdigest()[:16]


def test_w4a8_and_w4a16_grid_end_to_end(tmp_path):
    code, out = run("run", "--model", "tiny:qwen2-vl", "--methods", "rtn,smoothquant,gptq", "--bits", "4", "--act-bits", "8,16",
                    "--calib-n", "2", "--no-latency", "--device", "cpu", "--runs", tmp_path, "--name", "r")
    assert code == 0, out
    assert "rtn w4a8: done" in out and "rtn w4: done" in out
    con = sqlite3.connect(tmp_path / "results.sqlite")
    cells = [(m, b, json.loads(o), cid, s) for m, b, o, cid, s in
             con.execute("select method, bits, method_options, cell_id, status from cells")]
    assert len(cells) == 6 and all(c[4] == "done" for c in cells)
    weight_only = {m: cid for m, b, o, cid, s in cells if "act_bits" not in o}
    acts = {m: o["act_bits"] for m, b, o, cid, s in cells if "act_bits" in o}
    assert acts == {"rtn": 8, "smoothquant": 8, "gptq": 8} and set(weight_only) == {"rtn", "smoothquant", "gptq"}
    for m, cid in WEIGHT_ONLY_IDS.items():
        assert weight_only[m] == cid, m
    assert weights_digest(tmp_path / "r" / "cells" / WEIGHT_ONLY_IDS["rtn"] / "model.safetensors") == RTN_W4_WEIGHTS
    code, md = run("leaderboard", "--runs", tmp_path)
    assert code == 0, md
    assert "| rtn | W4A8 g32 |" in md and "| rtn | W4 g32 |" in md and "act_bits" not in md
    w4a8 = next(cid for m, b, o, cid, s in cells if m == "rtn" and "act_bits" in o)
    with pytest.raises(BadInput, match="weight-activation cell"):  # a GPTQ checkpoint would silently drop A8
        export_gptq(tmp_path / "r" / "cells" / w4a8 / "model.safetensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_weight_only_spec_is_bit_identical_for_every_method(tiny_qwen, tiny_calib):
    """act_bits=16, given or not, is today's weight-only quantization: no hook, the same weights, for every
    built-in method (one block each, to keep it short)."""
    model = tiny_qwen[0]
    for name, (cls, origin) in all_methods().items():
        if origin != "builtin":
            continue
        got = []
        for spec in (QuantSpec(bits=3, group_size=32), QuantSpec(bits=3, group_size=32, act_bits=16)):
            m = copy.deepcopy(model)
            got.append(quantize_model(m, adapter_for(m), tiny_calib, get_method(name)(spec), max_blocks=1).quantized)
            assert all(not mod._forward_pre_hooks for mod in m.modules())
        for n, qw in got[0].items():
            assert torch.equal(got[1][n].qweight, qw.qweight) and torch.equal(got[1][n].scale, qw.scale), (name, n)


def test_evaluation_hooks_every_quantized_linear_and_only_those(tiny_qwen, tiny_calib):
    model = copy.deepcopy(tiny_qwen[0])
    names = list(quantize_model(model, adapter_for(model), tiny_calib, get_method("rtn")(QuantSpec(bits=4, group_size=32)),
                                max_blocks=2).quantized)
    assert names and all(".layers.0." in n or ".layers.1." in n for n in names)
    assert install_cell_activations(Cell("rtn", 4, {}, "x"), model, names) == []  # weights only: nothing
    handles = install_cell_activations(Cell("rtn", 4, {}, "x", act_bits=8), model, names)
    hooked = {n for n, mod in model.named_modules() if mod._forward_pre_hooks}
    assert hooked == set(names) and len(handles) == len(names)


TASKS = ["--model", "tiny:qwen2-vl", "--methods", "rtn", "--bits", "4", "--calib-n", "2", "--no-latency", "--device", "cpu",
         "--eval-n", "4"]


def test_a_w4a8_task_scores_the_same_on_reloaded_weights(tmp_path):
    """A task added later is scored on the cell's saved weights with the activation quantizer installed again:
    the same value a fresh run computes, and not the weight-only one."""
    base = [*TASKS, "--act-bits", "8,16"]
    assert run("run", *base, "--tasks", "synthvqa-nll", "--runs", tmp_path / "a")[0] == 0
    assert run("run", *base, "--tasks", "synthvqa-nll,synthvqa", "--runs", tmp_path / "a")[0] == 0  # reload path
    assert run("run", *base, "--tasks", "synthvqa-nll,synthvqa", "--runs", tmp_path / "b")[0] == 0  # fresh

    def values(runs):
        con = sqlite3.connect(runs / "results.sqlite")
        return {(json.loads(o).get("act_bits", 16), t, m): v for o, t, m, v in con.execute(
            "select method_options, task, metric, value from results where task like 'synthvqa%' and method='rtn'")}

    a, b = values(tmp_path / "a"), values(tmp_path / "b")
    assert a == b
    nll = [k for k in a if k[0] == 8 and k[1] == "synthvqa-nll"]
    assert nll and all(a[k] != a[(16, *k[1:])] for k in nll)


def test_latency_of_activation_formats_is_measured_and_keyed_by_act_bits(tmp_path, monkeypatch):
    """W4A8 and W4 are two formats with their own latency rows (a W4A8 figure never serves W4): per-channel W4A8
    runs the integer kernel, grouped W4A8 the weight kernel after a simulated quantizer, each labelled so."""
    fast = functools.partial(formats.measure_interleaved, min_rounds=1, max_rounds=2)  # the rows, not the figures
    monkeypatch.setattr(formats, "measure_interleaved", fast)
    base = ["--model", "tiny:qwen2-vl", "--methods", "rtn", "--bits", "4", "--act-bits", "8,16", "--calib-n", "2",
            "--device", "cpu", "--runs", tmp_path, "--no-save-model", "--latency-tokens", "2", "--tasks", "synthvqa-nll",
            "--eval-n", "2"]
    for group, timed in (("-1", 3), ("32", 2)):  # FP, W4A8 and W4; then W4A8 and W4 of g32 (FP is stored)
        code, out = run("run", *base, "--group-size", group)
        assert code == 0, out
        assert "NOT MEASURED" not in out and f"[latency] timing {timed} format(s)" in out
    con = sqlite3.connect(tmp_path / "results.sqlite")
    rows = {(m, b, g, json.loads(o).get("act_bits", 16)): (k, cid, tok) for m, b, g, o, k, cid, tok in con.execute(
        "select method, bits, group_size, method_options, kernel, cell_id, decode_tok_s from results "
        "where metric = 'decode_tok_s'")}
    fmt = {k[2:]: v for k, v in rows.items() if k[0] == "format"}
    assert set(fmt) == {(-1, 8), (-1, 16), (32, 8), (32, 16)}
    assert fmt[(-1, 8)][0] == "int8dyn[bf16]" and fmt[(32, 8)][0] == "int4pack+fakeA8[bf16]"
    assert "fakeA" not in fmt[(-1, 16)][0] + fmt[(32, 16)][0] and "int8dyn" not in fmt[(-1, 16)][0] + fmt[(32, 16)][0]
    assert len({v[1] for v in fmt.values()}) == 4 and all(v[2] > 0 for v in fmt.values())
    code, md = run("leaderboard", "--runs", tmp_path)
    assert code == 0, md
    deploy_rows = [line for line in md.splitlines() if line.startswith("| rtn | W4")]
    assert any("W4A8 per-channel" in r and "int8dyn[bf16]" in r for r in deploy_rows)
    assert any("W4A8 g32" in r and "int4pack+fakeA8[bf16]" in r for r in deploy_rows)


def test_latency_of_a_static_format_is_measured_with_its_own_key(tmp_path, monkeypatch):
    """W4A8t (per-tensor static) is timed on an RTN model whose scales the engine calibrated: its own row,
    labelled as the simulated static quantizer it runs."""
    fast = functools.partial(formats.measure_interleaved, min_rounds=1, max_rounds=2)
    monkeypatch.setattr(formats, "measure_interleaved", fast)
    code, out = run("run", "--model", "tiny:qwen2-vl", "--methods", "rtn", "--bits", "4", "--act-bits", "8",
                    "--act-scheme", "tensor", "--group-size", "32", "--calib-n", "2", "--device", "cpu", "--runs", tmp_path,
                    "--no-save-model", "--latency-tokens", "2")
    assert code == 0, out
    assert "NOT MEASURED" not in out and "[latency] timing 2 format(s)" in out and "W4A8t g32" in out
    con = sqlite3.connect(tmp_path / "results.sqlite")
    kernels = {json.loads(o).get("act_scheme", "token"): k for o, k in con.execute(
        "select method_options, kernel from results where method = 'format' and metric = 'decode_tok_s'")}
    assert kernels == {"tensor": "int4pack+fakeA8t[bf16]"}
