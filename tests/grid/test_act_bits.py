"""Weight-activation formats as a grid axis (--act-bits): weight-only cells keep their identity and weights,
W4A8 cells are their own, the leaderboard names them, evaluation runs with the activation quantizer (on
fresh and on reloaded weights alike), and latency is not faked."""

import copy
import hashlib
import json
import sqlite3
from types import SimpleNamespace

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


def test_latency_of_activation_formats_is_not_faked(monkeypatch):
    lines = []
    grid = SimpleNamespace(cfg=SimpleNamespace(quant=SimpleNamespace(act_bits=[8, 16]), deploy=SimpleNamespace(latency=True)))
    monkeypatch.setattr(formats, "_claim_formats", lambda *a: [])
    assert formats.run_formats(grid, None, "me", lines.append) == []
    assert len(lines) == 1 and "NOT MEASURED" in lines[0] and "A8" in lines[0]
    grid.cfg.quant.act_bits = [16]
    lines.clear()
    formats.run_formats(grid, None, "me", lines.append)
    assert lines == []
