"""Leaderboard rendering: missing is never 0, escaping, best-per-column, same numbers in every format."""

import json
import re

import pytest

from ptqbench.errors import BadInput
from ptqbench.leaderboard import leaderboard, render
from ptqbench.leaderboard.render import fmt_num, higher_is_better, pareto_front
from ptqbench.eval.stats import wilson
from ptqbench.grid.store import DB_NAME, ResultsStore

EVIL = "<script>alert(1)</script>"


def add(store, method, bits, metrics, *, fail=None, model="tiny", size=None, items=None, **stats):
    """A cell with its rows; `items`: {(task, metric): list of 0/1 outcomes} stored as the unit's items."""
    k = {"model": model, "method": method, "method_options": {}, "bits": bits,
         "group_size": None if bits >= 16 else 128, "sym": False, "calib_hash": None if bits >= 16 else "c0ffee"}  # fmt: skip
    cid = ResultsStore.cell_id(**k)
    store.start_cell(cid, {**k, "env": {"torch": "2.x"}, "kernel": "dequant-fp16", "device": "cpu"})
    if fail:
        store.fail_cell(cid, fail)
        return
    store.finish_cell(cid, [{"task": "recon", "metric": "final_rel_err", "value": 0.1, "model_bytes": size, **stats}]
                      if bits < 16 else [], {})
    for task in sorted({t for t, _ in metrics}):
        its = {m: {"kind": "proportion", "items": items[(t, m)], "weights": None} for (t, m) in metrics if t == task and (t, m) in (items or {})}
        rows = []
        for (t, m), v in metrics.items():
            if t == task:
                its_tm = (items or {}).get((t, m))
                ci = dict(zip(("ci_low", "ci_high"), wilson(int(sum(its_tm)), len(its_tm)))) if its_tm else {}
                rows.append({"task": t, "metric": m, "value": v, "n": len(its_tm) if its_tm else None, "model_bytes": size,
                             **ci, **stats})
        store.record_unit(cid, "u-" + task, "eval", {"task": task}, rows, items=its)


def outcomes(k: int, n: int = 200, shift: int = 0) -> list[float]:
    """n items of which k are right, the right ones starting at `shift` (so two lists can pair up)."""
    return [1.0 if (i - shift) % n < k else 0.0 for i in range(n)]


@pytest.fixture
def store(tmp_path):
    s = ResultsStore(tmp_path)
    acc, fam, nll = ("synthvqa", "acc"), ("synthvqa", "acc/color"), ("synthvqa-nll", "nll")
    add(s, "fp16", 16, {acc: 0.9, fam: 0.95, nll: 1.0}, size=4_000_000, prefill_ms=40.0, prefill_ms_spread=1.5)
    add(s, "rtn", 4, {acc: 0.6, fam: 0.7, nll: 1.1}, size=1_100_000, calib_seconds=0.5)
    add(s, "gptq", 4, {acc: 0.7, fam: 0.65, nll: 1.3}, size=1_100_000, calib_seconds=12.25)
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


def find(rows, method, fmt):
    (r,) = [r for r in rows if r["method"] == method and r["format"].startswith(fmt)]
    return r


def test_higher_is_better():
    assert higher_is_better("acc") and higher_is_better("acc/error_detection") and higher_is_better("f1")
    for m in ("nll", "loss", "error_rate", "latency_ms", "peak_memory", "ppl"):
        assert not higher_is_better(m)


def test_partial_grid_shows_missing_not_zero(store):
    md = render(store.rows(), "md", cells=store.cells())
    tables = md_tables(md)
    assert list(tables)[0] == "Accuracy"  # the headline first
    fam = tables["Accuracy per family"]
    assert find(fam, "gptq", "W3")["synthvqa acc/color"] == "—"  # not run
    assert find(tables["Accuracy"], "gptq", "W3")["synthvqa acc"] == "0.5000"
    failed = find(tables["Accuracy"], "awq", "W3")
    assert all(v.startswith("—") for k, v in failed.items() if k not in ("method", "format"))
    note = re.search(r"^(\d+)\. failed: CUDA out of memory \\\| at layer 3$", md, re.M)
    assert note and failed["synthvqa acc"] == f"— [{note.group(1)}]"
    assert find(tables["Deployment"], "awq", "W3")["model bytes as deployed (MB)"].startswith("—")
    assert find(tables["Calibration cost"], "rtn", "W4")["calibration time (s)"] == "0.5000"
    assert not re.search(r"\|\s*0(\.0+)?\s*\|", md)  # no zero anywhere: every value here is non-zero

    assert "Traceback" not in md  # notes keep the error's first line; JSON keeps all of it
    html = render(store.rows(), "html", cells=store.cells())
    assert 'title="failed: CUDA out of memory | at layer 3"' in html
    doc = json.loads(render(store.rows(), "json", cells=store.cells()))
    acc_json = doc["tables"]["tiny"][0]["rows"]
    (awq,) = [r for r in acc_json if r["method"]["text"] == "awq"]
    assert awq["synthvqa acc"]["value"] is None and "CUDA" in awq["synthvqa acc"]["note"]
    assert any("Traceback" in (c["error"] or "") for c in doc["cells"])


def test_best_only_where_significant(tmp_path):
    """Bold needs a paired test over the same items to put the best above the runner-up; Δ vs FP says * the same way."""
    s = ResultsStore(tmp_path)
    acc = ("synthvqa", "acc")
    fp = outcomes(190)
    add(s, "fp", 16, {acc: 0.95}, items={acc: fp})
    add(s, "gptq", 4, {acc: 0.945}, items={acc: outcomes(189)})  # one item fewer than fp: not significant
    add(s, "rtn", 4, {acc: 0.94}, items={acc: outcomes(188)})  # one fewer than gptq: a tie with it
    add(s, "gptq", 2, {acc: 0.80}, items={acc: outcomes(160)})
    add(s, "rtn", 2, {acc: 0.40}, items={acc: outcomes(80)})  # 80 discordant pairs, all one way: significant
    doc = json.loads(render(s.rows(), "json", cells=s.cells(), units=s.units()))
    rows = {(r["method"]["text"], r["format"]["text"]): r for r in doc["tables"]["tiny"][0]["rows"]}
    col = "synthvqa acc (n=200)"
    assert not rows[("gptq", "W4 g128")][col]["best"] and not rows[("rtn", "W4 g128")][col]["best"]  # tied
    assert rows[("gptq", "W2 g128")][col]["best"] and not rows[("rtn", "W2 g128")][col]["best"]
    assert rows[("gptq", "W4 g128")]["Δ acc vs FP"]["text"] == "-0.0050"  # not significant: no *
    assert rows[("rtn", "W2 g128")]["Δ acc vs FP"]["text"] == "-0.5500*"
    cell = rows[("gptq", "W2 g128")][col]
    assert cell["n"] == 200 and "[" in cell["text"]
    md = md_tables(render(s.rows(), "md", cells=s.cells(), units=s.units()))["Accuracy"]
    assert find(md, "gptq", "W2")[col].startswith("**0.8000")


def test_intervals_are_shown_from_the_store(tmp_path):
    s = ResultsStore(tmp_path)
    lo, hi = wilson(195, 200)
    k = {"model": "m", "method": "rtn", "method_options": {}, "bits": 4, "group_size": 64, "sym": False, "calib_hash": "c"}
    cid = ResultsStore.cell_id(**k)
    s.start_cell(cid, k)
    s.finish_cell(cid, [])
    s.record_unit(cid, "u", "eval", {"task": "synthvqa"}, [{"task": "synthvqa", "metric": "acc", "value": 0.975, "n": 200,
                                                            "ci_low": lo, "ci_high": hi}])
    md = md_tables(render(s.rows(), "md", cells=s.cells(), units=s.units()))
    assert md["Accuracy"][0]["synthvqa acc (n=200)"] == f"0.9750 [{fmt_num(lo)}, {fmt_num(hi)}]"
    tex = render(s.rows(), "latex", cells=s.cells(), units=s.units())
    assert r"\toprule" in tex and r"synthvqa acc (n=200)" in tex and fmt_num(lo) in tex
    csv_text = render(s.rows(), "csv", cells=s.cells(), units=s.units())
    import csv as _csv
    import io

    (row,) = list(_csv.DictReader(io.StringIO(csv_text)))
    assert row["n"] == "200" and float(row["ci_low"]) == lo and float(row["value"]) == 0.975


def test_latex_and_csv_escape_everything(tmp_path):
    s = ResultsStore(tmp_path)
    evil = 'a_b & c % $x$ #1 {y} ~z ^w \\ <t>'
    add(s, evil, 4, {("vqa" + evil, "acc"): 0.5}, model=evil, size=10**6)
    tex = render(s.rows(), "latex", cells=s.cells())
    from ptqbench.leaderboard.render import tex_escape

    assert evil not in tex and tex_escape(evil) in tex
    assert tex_escape("a_b & c%") == r"a\_b \& c\%" and tex_escape("\\") == r"\textbackslash{}"
    csv_text = render(s.rows(), "csv", cells=s.cells())
    import csv as _csv
    import io

    (row,) = [r for r in _csv.DictReader(io.StringIO(csv_text)) if r["task"] != "recon"]
    assert row["method"] == evil and row["model"] == evil  # quoted, not split or altered


def test_md_and_json_carry_the_store_numbers(store):
    rows = store.rows()
    md = md_tables(render(rows, "md", cells=store.cells()))
    for r in rows:
        if r["task"] == "recon":
            continue
        fmt = "FP" if r["bits"] >= 16 else f"W{r['bits']}"
        table = md["Accuracy per family"] if "/" in r["metric"] else md["Accuracy"]
        shown = find(table, r["method"], fmt)[f"{r['task']} {r['metric']}"]
        assert shown.strip("*").split(" ")[0] == fmt_num(r["value"])
    assert find(md["Calibration cost"], "gptq", "W4")["calibration time (s)"] == "12.25"
    assert find(md["Deployment"], "gptq", "W4")["model bytes as deployed (MB)"] == "1.10"
    assert find(md["Deployment"], "fp16", "FP")["prefill (ms, median ± IQR)"] == "40.00 ± 1.5000"
    assert "avg" not in md["Accuracy"][0]  # one higher-is-better headline (nll is lower-is-better): nothing to average
    assert find(md["Accuracy"], "gptq", "W4")["Δ acc vs FP"] == "-0.2000"  # no items: no significance claimed

    doc = json.loads(render(rows, "json", cells=store.cells()))
    assert doc["rows"] == json.loads(json.dumps(rows))  # every row, provenance included, unchanged
    assert all(r["env"] == {"torch": "2.x"} and "config" in r and "calib_hash" in r for r in doc["rows"])
    assert doc["header"]["calibration"][0]["hash"] == "c0ffee"
    assert "{" not in render(rows, "md", cells=store.cells()).split("## tiny")[0]  # no raw JSON in the header


def test_noisy_latency_is_flagged(tmp_path):
    s = ResultsStore(tmp_path)
    add(s, "rtn", 4, {("synthvqa", "acc"): 0.5}, size=10**6, prefill_ms=10.0, prefill_ms_spread=5.0,
        decode_tok_s=100.0, decode_tok_s_spread=1.0)
    (row,) = md_tables(render(s.rows(), "md", cells=s.cells()))["Deployment"]
    assert row["prefill (ms, median ± IQR)"] == "10.00 ± 5.0000 (noisy)"
    assert row["decode (tok/s, median ± IQR)"] == "100.00 ± 1.0000"


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
    assert html.startswith("<!DOCTYPE html>") and html.count("<svg") >= 4  # accuracy vs bits x2, Pareto, cost, throughput
    fetches = [u for u in re.findall(r"https?://[^\"' )]+", html) if not u.startswith(("http://www.w3.org/", "http://purl.org/",
                                                                                      "http://creativecommons.org/", "https://matplotlib.org"))]
    assert fetches == []  # namespaces and metadata, never a fetch
    assert "<link" not in html and " src=" not in html and "@import" not in html
    assert "table.sortable th" in html and html.index("<table") < html.index("<svg")  # the accuracy table comes first


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


def test_a_format_latency_shows_on_every_row_of_that_format(tmp_path):
    """Latency is stored once per format (grid/formats.py's 'format' cells) and shown on each method's row."""
    s = ResultsStore(tmp_path)
    acc = ("synthvqa", "acc")
    for method in ("rtn", "gptq", "awq"):
        add(s, method, 4, {acc: 0.5}, size=10**6)
    add(s, "rtn", 2, {acc: 0.3}, size=10**6)
    k = {"model": "tiny", "method": "format", "method_options": {}, "bits": 4, "group_size": 128, "sym": False, "calib_hash": "-"}
    cid = ResultsStore.cell_id(**k)
    s.claim(cid, k)
    s.record_unit(cid, "d", "deploy", {"kernel": "auto"}, [
        {"task": "deploy", "metric": "decode_tok_s", "value": 123.0, "decode_tok_s": 123.0, "decode_tok_s_spread": 2.0,
         "prefill_ms": 9.0, "prefill_ms_spread": 0.1, "kernel": "int4pack[bf16]", "model_bytes": 2 * 10**6, "n": 9},
        {"task": "deploy", "metric": "decode_tok_s_cv", "value": 0.02, "n": 9},
        {"task": "deploy", "metric": "prefill_ms_cv", "value": 0.2, "n": 9}])
    md = md_tables(render(s.rows(), "md", cells=s.cells(), units=s.units()))
    dep = md["Deployment"]
    w4 = [r for r in dep if r["format"] == "W4 g128"]
    assert len(w4) == 3 and {r["decode (tok/s, median ± IQR)"] for r in w4} == {"123.00 ± 2.0000"}
    assert {r["prefill (ms, median ± IQR)"] for r in w4} == {"9.0000 ± 0.1000 (noisy, CV 20%)"}
    assert {r["kernel"] for r in w4} == {"int4pack[bf16]"} and {r["model bytes as deployed (MB)"] for r in w4} == {"2.00"}
    assert find(dep, "rtn", "W2")["decode (tok/s, median ± IQR)"].startswith("—")  # no W2 format timed
    assert all(r["method"] != "format" for table in md.values() for r in table)  # the format cell is no row of its own


def test_several_models_get_a_summary_first(tmp_path):
    s = ResultsStore(tmp_path)
    add(s, "rtn", 4, {("synthvqa", "acc"): 0.5}, model="model-a", size=10**6)
    add(s, "rtn", 4, {("synthvqa", "acc"): 0.25}, model="model-b", size=10**6)
    add(s, "gptq", 4, {("synthvqa", "acc"): 0.75}, model="model-b", size=10**6)
    md = render(s.rows(), "md", cells=s.cells())
    assert md.index("## Summary across models") < md.index("## model-a") < md.index("## model-b")
    summary = md_tables(md)["Summary across models"]
    assert find(summary, "rtn", "W4")["model-a: synthvqa acc"] == "0.5000" and find(summary, "rtn", "W4")["model-b: synthvqa acc"] == "0.2500"
    assert find(summary, "gptq", "W4")["model-a: synthvqa acc"] == "—"
    assert r"\caption{Summary across models: Summary across models}" in render(s.rows(), "latex", cells=s.cells())


def test_output_files_follow_the_umask(store, tmp_path):
    import os

    old = os.umask(0o022)
    try:
        out = tmp_path / "board.md"
        leaderboard(store.runs_dir, "md", out)
        assert (out.stat().st_mode & 0o777) == 0o644  # not mkstemp's 0600: the user's file, to share
    finally:
        os.umask(old)
