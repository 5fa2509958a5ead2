"""The research probes' building blocks (experiments/): rank truncation (noise_sensitivity.py), the
linear probe (position_probe.py) and the attention reader (where_learnability.py) measure what they
say, on planted data."""

import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _load(name):
    """experiments/<name>.py loaded from its file, as `python experiments/<name>.py` runs it."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_top_rank_truncation():
    ns = _load("noise_sensitivity")
    w = torch.randn(96, 64)
    assert torch.equal(ns.top_rank(w, 0), w)
    t = ns.top_rank(w, 5)
    assert int(torch.linalg.matrix_rank(t)) == 5
    assert float((t - w).norm()) < float(w.norm())


def test_linear_probe_reads_a_linear_code_and_not_noise():
    pp = _load("position_probe")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=g)
    assert pp.linear_probe(x, (x[:, 3] > 0).long(), 2) > 0.95
    assert pp.linear_probe(x, torch.randint(0, 4, (400,), generator=g), 4) < 0.45


def test_where_reader_learns_a_planted_position_and_not_noise():
    """The attention reader of experiments/where_learnability.py finds a named object's side of the image
    when the tokens carry it, and stays near chance when the answers are unrelated to the tokens."""
    from types import SimpleNamespace

    from ptqbench.data import synthvqa as sv

    wl = _load("where_learnability")
    g = torch.Generator().manual_seed(0)
    n, tokens, dim = 600, 16, 32
    colours, shapes = list(sv.COLORS), list(sv.SHAPES)
    feats = torch.randn(n, tokens, dim, generator=g) * 0.1
    items, rel = [], torch.randint(0, 4, (n,), generator=g)
    for i in range(n):
        c, s, t = int(torch.randint(0, 6, (1,), generator=g)), int(torch.randint(0, 4, (1,), generator=g)), i % tokens
        feats[i, t, c] += 3.0  # colour one-hot
        feats[i, t, 6 + s] += 3.0  # shape one-hot
        feats[i, t, 10 + int(rel[i])] += 3.0  # where it is
        items.append((i, SimpleNamespace(question=f"where is the {colours[c]} {shapes[s]} in the image?",
                                         answer=sv.RELATIONS[int(rel[i])], family="where")))
    quiet = lambda *_: None  # noqa: E731
    assert wl.train_reader(feats, items, 250, log=quiet) > 0.9
    shuffled = [(i, SimpleNamespace(question=it.question, answer=sv.RELATIONS[int(r)], family="where"))
                for (i, it), r in zip(items, torch.randint(0, 4, (n,), generator=g))]
    assert wl.train_reader(feats, shuffled, 250, log=quiet) < 0.45


def test_eval_cache_benchmark_agrees_and_reports(tmp_path):
    """experiments/eval_cache.py scores plain and cached alike (it exits 1 when the scores differ)."""
    import json

    ec = _load("eval_cache")
    out = tmp_path / "figures.json"
    assert ec.main(["--n", "2", "--bits", "2", "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert set(figures["median"]["plain"]) == {"fp", "rtn w2"} and figures["cache"]["tower_hits"] == 3
