"""Leaderboard rendering: missing is never 0, escaping, best-per-column, same numbers in every format."""

import json
import re

import pytest

from ptqbench.errors import BadInput
from ptqbench.leaderboard import leaderboard, render
from ptqbench.leaderboard.render import fmt_num, higher_is_better, pareto_front
from ptqbench.leaderboard.store import DB_NAME, ResultsStore

EVIL = "<script>alert(1)</script>"


def add(store, method, bits, metrics, *, fail=None, model="tiny", size=None, **stats):
    k = {"model": model, "method": method, "method_options": {}, "bits": bits,
         "group_size": None if bits >= 16 else 128, "sym": False, "calib_hash": None if bits >= 16 else "c0ffee"}  # fmt: skip
    cid = ResultsStore.cell_id(**k)
    store.start_cell(cid, {**k, "env": {"torch": "2.x"}, "kernel": "dequant-fp16", "device": "cpu"})
    if fail:
        store.fail_cell(cid, fail)
        return
    rows = [{"task": t, "metric": m, "value": v, "model_bytes": size, **stats} for (t, m), v in metrics.items()]
    store.finish_cell(cid, rows, {})


@pytest.fixture
def store(tmp_path):
    s = ResultsStore(tmp_path)
    acc, fam, nll = ("synthvqa", "acc"), ("synthvqa", "acc/color"), ("synthvqa-nll", "nll")
    add(s, "fp16", 16, {acc: 0.9, fam: 0.95, nll: 1.0}, size=4_000_000, prefill_ms=40.0, prefill_ms_spread=1.5)
    add(s, "rtn", 4, {acc: 0.6, fam: 0.7, nll: 1.1}, size=1_100_000, calib_seconds=0.5)  # best nll at 4 bits
    add(s, "gptq", 4, {acc: 0.7, fam: 0.65, nll: 1.3}, size=1_100_000, calib_seconds=12.25)  # best acc at 4 bits
    add(s, "gptq", 3, {acc: 0.5, nll: 1.8}, size=900_000)  # partial: acc/color never ran
    add(s, "awq", 3, {}, fail="CUDA out of memory | at layer 3\nTraceback (most recent call last):\n  File x")
    add(s, "rtn", 2, {acc: 0.3, fam: 0.3, nll: 2.5}, size=600_000)  # alone at 2 bits: nothing to beat
    return s


def md_tables(md: str) -> dict[str, list[dict]]:
    """Markdown tables by their ### title, each row a dict header -> cell text."""
    tables, title, header = {}, None, None
    for line in md.splitlines():
        if line.startswith("### "):
            title, header = line[4:], None
        elif line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            if header is None:
                header = cells
                tables[title] = []
            else:
                tables[title].append(dict(zip(header, cells)))
    return tables


def find(rows, method, bits):
    (r,) = [r for r in rows if r["method"] == method and r["bits"] == str(bits)]
    return r


def test_higher_is_better():
    assert higher_is_better("acc") and higher_is_better("acc/error_detection") and higher_is_better("f1")
    for m in ("nll", "loss", "error_rate", "latency_ms", "peak_memory", "ppl"):
        assert not higher_is_better(m)


def test_partial_grid_shows_missing_not_zero(store):
    md = render(store.rows(), "md", cells=store.cells())
    acc = md_tables(md)["Accuracy"]
    assert find(acc, "gptq", 3)["synthvqa acc/color"] == "—"  # not run
    assert find(acc, "gptq", 3)["synthvqa acc"] == "0.5000"
    failed = find(acc, "awq", 3)
    assert all(v.startswith("—") for k, v in failed.items() if k not in ("method", "bits", "config"))
    note = re.search(r"^(\d+)\. failed: CUDA out of memory \\\| at layer 3$", md, re.M)
    assert note and failed["synthvqa acc"] == f"— [{note.group(1)}]"
    deploy = md_tables(md)["Deployment"]
    assert find(deploy, "awq", 3)["model size (MB)"].startswith("—")
    assert find(md_tables(md)["Calibration cost"], "fp16", 16)["calibration time (s)"] == "—"
    assert not re.search(r"\|\s*0(\.0+)?\s*\|", md)  # no zero anywhere: every value here is non-zero

    assert "Traceback" not in md  # notes keep the error's first line; JSON keeps all of it
    html = render(store.rows(), "html", cells=store.cells())
    assert 'title="failed: CUDA out of memory | at layer 3"' in html
    doc = json.loads(render(store.rows(), "json", cells=store.cells()))
    acc_json = doc["tables"]["tiny"][0]["rows"]
    (awq,) = [r for r in acc_json if r["method"]["text"] == "awq"]
    assert awq["synthvqa acc"]["value"] is None and "CUDA" in awq["synthvqa acc"]["note"]
    assert any("Traceback" in (c["error"] or "") for c in doc["cells"])


def test_best_per_column(store):
    doc = json.loads(render(store.rows(), "json", cells=store.cells()))
    acc = {(r["method"]["text"], r["bits"]["value"]): r for r in doc["tables"]["tiny"][0]["rows"]}
    best = {k: {c for c, v in r.items() if v["best"]} for k, r in acc.items()}
    assert best[("gptq", 4)] == {"synthvqa acc", "avg", "Δ avg vs FP"}
    assert best[("rtn", 4)] == {"synthvqa acc/color", "synthvqa-nll nll"}  # nll: lower is better
    assert best[("fp16", 16)] == set()  # the reference is not a contender
    assert best[("rtn", 2)] == set()  # alone at its bit width
    assert best[("gptq", 3)] == set()  # its only rival failed
    md_acc = md_tables(render(store.rows(), "md", cells=store.cells()))["Accuracy"]
    assert find(md_acc, "rtn", 4)["synthvqa-nll nll"] == "**1.1000**"
    assert find(md_acc, "gptq", 4)["synthvqa-nll nll"] == "1.3000"
    html = render(store.rows(), "html", cells=store.cells())
    assert html.count('class=" best"') == 5


def test_md_and_json_carry_the_store_numbers(store):
    rows = store.rows()
    md = md_tables(render(rows, "md", cells=store.cells()))
    for r in rows:
        shown = find(md["Accuracy"], r["method"], r["bits"])[f"{r['task']} {r['metric']}"]
        assert shown.strip("*") == fmt_num(r["value"])
    gptq4 = [r for r in rows if r["method"] == "gptq" and r["bits"] == 4]
    assert find(md["Calibration cost"], "gptq", 4)["calibration time (s)"] == "12.25"
    assert find(md["Deployment"], "gptq", 4)["model size (MB)"] == "1.10" and gptq4[0]["model_bytes"] == 1_100_000
    assert find(md["Deployment"], "fp16", 16)["prefill (ms, median ± spread)"] == "40.00 ± 1.5000"
    assert find(md["Accuracy"], "gptq", 4)["avg"] == "**0.7000**"
    assert find(md["Accuracy"], "gptq", 4)["Δ avg vs FP"] == "**-0.2000**"

    doc = json.loads(render(rows, "json", cells=store.cells()))
    assert doc["rows"] == json.loads(json.dumps(rows))  # every row, provenance included, unchanged
    assert all(r["env"] == {"torch": "2.x"} and "config" in r and "calib_hash" in r for r in doc["rows"])
    assert doc["header"]["calibration"][0]["hash"] == "c0ffee"


def test_html_escapes_everything(tmp_path):
    s = ResultsStore(tmp_path)
    add(s, EVIL, 4, {("vqa" + EVIL, "acc"): 0.5}, model=EVIL, size=10**6)
    add(s, "fp16", 16, {("vqa" + EVIL, "acc"): 0.6}, model=EVIL, size=4 * 10**6)
    add(s, "rtn", 4, {}, model=EVIL, fail=f"boom {EVIL} \" onmouseover=\"x")
    html = render(s.rows(), "html", cells=s.cells())
    assert EVIL not in html and "<script>alert" not in html
    assert html.count("<script") == 1  # our own sorting script only
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert '" onmouseover="x' not in html
    md = render(s.rows(), "md", cells=s.cells())
    assert EVIL not in md and "&lt;script&gt;" in md


def test_html_is_self_contained_with_plots(store):
    html = render(store.rows(), "html", cells=store.cells())
    assert html.startswith("<!DOCTYPE html>") and html.count("<svg") == 2
    assert re.findall(r"https?://[^\"' ]+", html) == ["http://www.w3.org/2000/svg"] * 2  # namespace, not a fetch
    assert "<link" not in html and " src=" not in html and "@import" not in html
    assert "table.sortable th" in html and "Pareto front" in html


def test_pareto_front():
    # (size, acc): the 2nd is beaten by the 3rd (smaller and better), the 4th by the 1st.
    assert sorted(pareto_front([(1, 0.5), (3, 0.6), (2, 0.7), (1.5, 0.4), (4, 0.9)])) == [0, 2, 4]


def test_leaderboard_entry_point(store, tmp_path):
    runs = store.runs_dir
    other = tmp_path / "keep.txt"
    other.write_text("mine")
    before = {p.name: p.read_bytes() for p in runs.iterdir()}
    out = runs / "board.html"
    text = leaderboard(runs, "html", out)
    assert out.read_text() == text
    after = {p.name: p.read_bytes() for p in runs.iterdir() if p.name != "board.html"}
    assert after.keys() <= before.keys() | {DB_NAME + "-wal", DB_NAME + "-shm"}
    assert after[DB_NAME] == before[DB_NAME] and other.read_text() == "mine"
    for bad in (runs / DB_NAME, runs):
        with pytest.raises(BadInput):
            leaderboard(runs, "md", bad)
    assert (runs / DB_NAME).read_bytes() == before[DB_NAME]
    with pytest.raises(BadInput, match="format"):
        leaderboard(runs, "pdf")


def test_leaderboard_on_empty_runs(tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        leaderboard(tmp_path / "missing", "md")
    with pytest.raises(BadInput, match="results.sqlite"):
        leaderboard(tmp_path, "md")
    ResultsStore(tmp_path)  # created, nothing written
    with pytest.raises(BadInput, match="no results yet"):
        leaderboard(tmp_path, "md")
