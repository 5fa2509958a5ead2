"""`bench run` with the grid's evaluation cache stores the very scores it stores without one, and shares the
full-precision vision tower's outputs across cells only while no cell quantizes the tower."""

import sqlite3

import pytest
from typer.testing import CliRunner

from ptqbench import cli
from ptqbench.eval.cache import EvalCache
from ptqbench.grid import plan

runner = CliRunner()


def run(*args):
    res = runner.invoke(cli.app, ["run", *map(str, args)], catch_exceptions=False)
    assert res.exit_code == 0, res.output


def stored(runs) -> dict:
    con = sqlite3.connect(runs / "results.sqlite")
    values = {(m, b, t, k): v for m, b, t, k, v in con.execute(
        "select method, bits, task, metric, value from results where task like 'synthvqa%'")}
    items = {(c, u): i for c, u, i in con.execute("select cell_id, unit, items_json from units")}
    return dict(values=values, items=items)


@pytest.mark.parametrize("quantize_vision", [False, True])
def test_grid_scores_identical_with_and_without_the_cache(tmp_path, monkeypatch, quantize_vision):
    made = []

    class Recording(EvalCache):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    args = ["--model", "tiny:qwen2-vl", "--methods", "rtn", "--bits", "2,4", "--calib-n", "2", "--group-size", "16",
            "--tasks", "synthvqa,synthvqa-nll", "--eval-n", "6", "--no-latency", "--no-save-model"]
    args += ["--quantize-vision"] if quantize_vision else []
    monkeypatch.setattr(plan, "EvalCache", Recording)
    run(*args, "--runs", tmp_path / "cached")
    monkeypatch.setattr(plan, "EvalCache", lambda *a, **k: None)
    run(*args, "--runs", tmp_path / "plain")
    cached, plain = stored(tmp_path / "cached"), stored(tmp_path / "plain")
    assert len(cached["values"]) == 3 * 14 and cached == plain  # fp, w2, w4: 7 metrics a task
    (cache,) = made
    assert cache.stats["encode_misses"] == 2 and cache.stats["encode_hits"] == 4  # one batch a task, 3 cells
    if quantize_vision:  # every cell's tower is its own
        assert cache.tower_path is None and cache.stats["tower_hits"] == 0
    else:  # computed once, by the first cell's first task
        assert cache.stats["tower_calls"] == 1 and cache.stats["tower_hits"] == 5
