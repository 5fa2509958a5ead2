"""Leaderboard generator: store rows -> Markdown, one self-contained HTML page, LaTeX, CSV or JSON.

Every format is built from the same Table objects, so they show the same numbers. Per model:
(a) accuracy first: method, format (W4 g64), each task's headline metric with its sample size and 95%
    interval, its change against full precision (* where a paired test over the same items says it is
    significant), and the average when there are several tasks; a value is marked best among rows of
    its bit width only when it beats the runner-up significantly, otherwise the rows are tied;
(b) per-family breakdown and (c) reconstruction diagnostics, apart from the headline;
(d) calibration cost; (e) deployment: bytes, latency (noisy figures flagged), memory, kernel.
A value that was not run or failed is shown as "—" (with the error in a title/footnote), never as 0.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from html import escape

import jinja2
from markupsafe import Markup

from ptqbench.errors import one_of
from ptqbench.grid.store import FORMAT_METHOD  # a format's own cell: its latency, shown on every row of that format

FORMATS = ("md", "html", "json", "latex", "csv")
ALPHA = 0.05  # significance level of every mark (best, change against full precision)
NOISY = 0.10  # a latency whose IQR exceeds this share of its median is flagged
FP_METHODS = {"fp", "fp16", "bf16", "fp32", "full", "none"}
MISSING = "—"
# Tokens of a metric name (before any "/family" breakdown) meaning smaller is better.
LOWER_IS_BETTER = {"nll", "loss", "error", "err", "ppl", "perplexity", "latency", "ms", "time", "seconds",
                   "sec", "bytes", "memory", "mem", "mse", "wer", "cer", "size"}  # fmt: skip


def higher_is_better(metric: str) -> bool:
    tokens = re.split(r"[^a-z0-9]+", metric.split("/")[0].lower())
    return not any(t in LOWER_IS_BETTER for t in tokens)


def fmt_num(v: float) -> str:
    a = abs(v)
    return f"{v:.4f}" if a < 10 else f"{v:.2f}" if a < 10_000 else f"{v:.0f}"


def fmt_mb(nbytes) -> str:
    mb = nbytes / 1e6
    return f"{mb:.3f}" if mb < 1 else f"{mb:.2f}" if mb < 100 else f"{mb:.1f}"  # tiny test models too


@dataclass
class TableCell:
    text: str = MISSING
    value: float | str | None = None  # raw value, for sorting and for JSON; None = missing
    best: bool = False
    note: str = ""  # why it is missing (failed + error); becomes a title and a footnote
    n: int | None = None  # items behind a task score
    ci: tuple[float, float] | None = None  # its 95% interval


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[TableCell]]
    notes: list[str] = field(default_factory=list)


@dataclass
class Entry:
    """One leaderboard row: every store row of one (method, options, bits, group, sym, calib)."""

    method: str
    bits: int
    config: str
    series: str  # label without the bit width: one line in the accuracy-vs-bits plot
    is_fp: bool
    fmt: str = ""  # the format: "W4 g64", "W3 per-channel sym", "W4A8 g64", "FP (float32)"
    opts_key: str = ""  # the method options as JSON: rows that differ only in calibration set share it
    metrics: dict = field(default_factory=dict)  # (task, metric) -> store row
    items: dict = field(default_factory=dict)  # (task, metric) -> {"kind", "items", "weights"} of that row
    note: str = ""  # cell-level failure
    act_bits: int = 16  # activation bits of a weight-activation format (16: weights only)


def _num(v, text=None, note="") -> TableCell:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return TableCell(note=note)  # the note (why it is missing) only matters when there is no value
    return TableCell(text if text is not None else fmt_num(v), float(v))


def _opts(o) -> dict:
    return json.loads(o) if isinstance(o, str) else dict(o or {})


def _is_fp(r) -> bool:
    return str(r["method"]).lower() in FP_METHODS or int(r["bits"]) >= 16


def _failure(error) -> str:
    """One line for a table note: errors are stored with their traceback (kept in full in JSON)."""
    first = next((line.strip() for line in str(error or "").splitlines() if line.strip()), "no error recorded")
    return "failed: " + (first if len(first) <= 300 else first[:299] + "…")


def _act_label(act_bits: int, act_scheme: str = "token") -> str:
    """A8 (per-token dynamic), A8t (per-tensor static), nothing for weights only."""
    return f"A{act_bits}" + ("t" if act_scheme == "tensor" else "") if act_bits < 16 else ""


def _format_label(bits: int, group_size: int, sym: bool, act_bits: int = 16, act_scheme: str = "token") -> str:
    return f"W{bits}" + _act_label(act_bits, act_scheme) + " " + ("per-channel" if group_size == -1 else f"g{group_size}") + (" sym" if sym else "")




def _act_bits(opts: dict) -> int:
    """A weight-activation cell keeps its activation bits in its options (weight-only cells have none)."""
    return int(opts.get("act_bits", 16))


def _act_scheme(opts: dict) -> str:
    """A static (per-tensor) W/A cell names its scheme in its options; per-token ones, as always, do not."""
    return str(opts.get("act_scheme", "token"))


def _format_of(r) -> tuple:
    opts = _opts(r.get("method_options"))
    return int(r["bits"]), int(r.get("group_size") or 0), bool(r.get("sym")), bool(opts.get("quantize_vision")), _act_bits(opts), _act_scheme(opts)


def _entries(rows: list[dict], cells: list[dict], units: list[dict]) -> list[Entry]:
    formats: dict[tuple, dict] = {}  # format -> (deploy, metric) -> row, timed once for every method of it
    for r in rows:
        if r["method"] == FORMAT_METHOD:
            formats.setdefault(_format_of(r), {})[(r["task"], r["metric"])] = r
    rows = [r for r in rows if r["method"] != FORMAT_METHOD]
    cells = [c for c in cells if c["method"] != FORMAT_METHOD]
    quant = [r for r in rows + cells if not _is_fp(r)]
    several_calibs = len({r.get("calib_hash") or "" for r in quant}) > 1
    # Runners record every option, defaults included: label a row only with the options that
    # differ between rows of its method, the rest is noise (and stays in the JSON).
    configs: dict[str, list[dict]] = {}
    for r in quant:
        configs.setdefault(r["method"], []).append(_opts(r.get("method_options")))
    varying = {m: {k for o in os_ for k in o if len({json.dumps(x.get(k, "<unset>")) for x in os_}) > 1}
               for m, os_ in configs.items()}  # fmt: skip
    dtypes = {c["cell_id"]: (c.get("key") or {}).get("dtype") for c in cells}
    unit_items = {(u["cell_id"], u["unit"]): u.get("items") or {} for u in units}
    entries: dict[tuple, Entry] = {}

    def entry(r) -> Entry:
        fp, opts = _is_fp(r), _opts(r.get("method_options"))
        gs, sym, calib = int(r.get("group_size") or 0), bool(r.get("sym")), r.get("calib_hash") or ""
        key = (r["method"], int(r["bits"])) if fp else (r["method"], json.dumps(opts, sort_keys=True), int(r["bits"]), gs, sym, calib)
        if key not in entries:
            act = _act_bits(opts)  # shown in the format, not as an option
            parts = [f"{k}={v}" for k, v in sorted(opts.items())
                     if k in varying.get(r["method"], ()) and k not in ("act_bits", "act_scheme")]
            parts += [f"calib {calib[:8]}"] if several_calibs and not fp else []
            label = f"FP ({dtypes.get(r['cell_id']) or 'dtype not recorded'})" if fp else _format_label(int(r["bits"]), gs, sym, act, _act_scheme(opts))
            acts = [_act_label(act, _act_scheme(opts))] if act < 16 else []
            series = " ".join([r["method"], *parts] + ([] if fp else acts + [label.split(" ", 1)[1]]))
            entries[key] = Entry(r["method"], int(r["bits"]), " ".join(parts), series, fp, label, json.dumps(opts, sort_keys=True),
                                 act_bits=act)
        return entries[key]

    for r in rows:  # by id: a later unit of the same task (another eval n) is the one shown
        e = entry(r)
        e.metrics[(r["task"], r["metric"])] = r
        e.items[(r["task"], r["metric"])] = unit_items.get((r["cell_id"], r.get("unit") or ""), {}).get(r["metric"])
    for e in entries.values():  # a method's row shows the latency of its format
        if not e.is_fp:
            r = next(iter(e.metrics.values()), None)
            for k, fr in (formats.get(_format_of(r)) or {}).items() if r else ():
                e.metrics.setdefault(k, fr)
    for c in cells:
        if c["status"] == "failed":
            entry(c).note = _failure(c.get("error"))
        elif c["status"] == "running" and not entry(c).metrics:
            entry(c).note = f"not finished (started {c.get('started_at')}, attempt {c.get('attempts')})"
    # Full precision first, then widest bits first (weight-only before weight-activation), then by method name.
    return sorted(entries.values(), key=lambda e: (not e.is_fp, -e.bits, -e.act_bits, e.method, e.config))


def _stat(e: Entry, name: str):
    """A per-cell number (cost, latency): the deployment's own row first (its model size is the deployed
    model's), then the first other row that has it."""
    rows = sorted(e.metrics.values(), key=lambda r: r.get("task") != "deploy")
    return next((r[name] for r in rows if r.get(name) is not None), None)


def _p_value(a: Entry, b: Entry, key) -> float | None:
    """Paired test of one metric between two rows over the same items (None: not comparable)."""
    from ptqbench.eval.stats import compare

    x, y = a.items.get(key), b.items.get(key)
    if not x or not y or x["kind"] != y["kind"] or len(x["items"]) != len(y["items"]):
        return None
    kw = {} if x["kind"] == "proportion" else dict(weights_a=x.get("weights"), weights_b=y.get("weights"))
    return compare(x["kind"], x["items"], y["items"], **kw)


def _score_cell(e: Entry, key, show_n: bool) -> TableCell:
    r = e.metrics.get(key)
    if r is None:
        return TableCell(note=e.note or "not run")
    if r["status"] != "ok":
        return TableCell(note=_failure(r.get("error")))
    v, lo, hi, n = r["value"], r.get("ci_low"), r.get("ci_high"), r.get("n")
    text = fmt_num(v) + ("" if lo is None or hi is None else f" [{fmt_num(lo)}, {fmt_num(hi)}]") + (f" n={n}" if show_n and n else "")
    return TableCell(text, float(v), n=n, ci=None if lo is None or hi is None else (lo, hi))


def _mark_best(cells_by_entry: list[tuple[Entry, TableCell]], key, higher: bool) -> None:
    """Bold the best quantized value of a format's bit widths only where a paired test puts it above the runner-up."""
    by_bits: dict[tuple[int, int], list[tuple[Entry, TableCell]]] = {}
    for e, c in cells_by_entry:
        if not e.is_fp and c.value is not None:
            by_bits.setdefault((e.bits, e.act_bits), []).append((e, c))
    for group in by_bits.values():
        if len(group) < 2:
            continue  # a lone method at a bit width is not "best" of anything
        group.sort(key=lambda ec: ec[1].value, reverse=higher)
        (best_e, best_c), (run_e, run_c) = group[0], group[1]
        if best_c.value == run_c.value:
            continue
        p = _p_value(best_e, run_e, key) if key is not None else None
        best_c.best = p is not None and p < ALPHA


def _tables(entries: list[Entry]) -> list[Table]:
    keys = sorted({k for e in entries for k in e.metrics if k[0] not in ("deploy", "recon")}, key=lambda k: (k[0], k[1]))
    head = [k for k in keys if "/" not in k[1]]
    family = [k for k in keys if "/" in k[1]]
    recon = sorted({k for e in entries for k in e.metrics if k[0] == "recon"}, key=lambda k: ("/" in k[1], k[1]))
    avg_keys = [k for k in head if higher_is_better(k[1])]
    fp = next((e for e in entries if e.is_fp), None)
    show_config = any(e.config for e in entries)
    lead_cols = ["method", "format"] + (["config"] if show_config else [])
    lead = lambda e: [TableCell(e.method, e.method, note=e.note), TableCell(e.fmt, e.fmt)] + ([TableCell(e.config, e.config)] if show_config else [])  # noqa: E731

    tables = [_accuracy_table(entries, head, avg_keys, fp, show_config, lead_cols, lead)]
    spread = _seed_spread(entries, head)
    if spread is not None:
        tables.append(spread)
    if family:  # (b) per family
        fam = Table("Accuracy per family", lead_cols + [f"{t} {m}" for t, m in family],
                    [lead(e) + [_score_cell(e, k, True) for k in family] for e in entries])
        fam.notes.append("Per question family: value [95% interval] n = items of that family.")
        tables.append(fam)
    if recon:  # (c) diagnostics
        rec = Table("Reconstruction diagnostics", lead_cols + [m.replace("/", " ") for _, m in recon],
                    [lead(e) + [_num(e.metrics[k]["value"]) if k in e.metrics else TableCell(note=e.note or "not run")
                                for k in recon] for e in entries if not e.is_fp])
        rec.notes.append("Relative output error of the quantized layers (linear_rel_err, mean over layers) and of the last "
                         "block's output (final_rel_err) on the calibration set, split by vision, text and answer tokens.")
        tables.append(rec)

    return tables + _cost_tables(entries, lead_cols, lead)


def _accuracy_table(entries, head, avg_keys, fp, show_config, lead_cols, lead) -> Table:
    """Headline metrics with n and interval, and the change against full precision."""
    columns, rows = list(lead_cols), [lead(e) for e in entries]
    for key in head:
        ns = {e.metrics[key].get("n") for e in entries if key in e.metrics}
        same_n = len(ns) == 1 and None not in ns
        columns.append(f"{key[0]} {key[1]}" + (f" (n={ns.pop()})" if same_n else ""))
        col = [_score_cell(e, key, not same_n) for e in entries]
        _mark_best(list(zip(entries, col)), key, higher_is_better(key[1]))
        for row, c in zip(rows, col):
            row.append(c)
        if fp is not None and fp.metrics.get(key, {}).get("status") == "ok":
            columns.append(f"Δ {key[1]} vs FP")
            base = fp.metrics[key]["value"]
            for e, row, c in zip(entries, rows, col):
                if c.value is None or e.is_fp:
                    row.append(TableCell(note=c.note) if not e.is_fp else TableCell("", None))
                    continue
                p = _p_value(e, fp, key)
                row.append(TableCell(f"{c.value - base:+.4f}" + ("*" if p is not None and p < ALPHA else ""), c.value - base))
    if len(avg_keys) > 1:
        columns.append("avg")
        col = []
        for e in entries:
            vals = [e.metrics[k]["value"] for k in avg_keys if k in e.metrics and e.metrics[k]["status"] == "ok"]
            col.append(_num(sum(vals) / len(vals) if len(vals) == len(avg_keys) else None, note=e.note or "some averaged metric is missing"))
        _mark_best(list(zip(entries, col)), None, True)  # no paired test for an average: never marked
        for row, c in zip(rows, col):
            row.append(c)
    acc = Table("Accuracy", columns, rows)
    acc.notes.append("Scores: value [95% interval] (Wilson for accuracies, bootstrap over items for means such as NLL); "
                     "n = items scored.")
    acc.notes.append(f"Bold: best at its bit width and better than the runner-up in a paired test over the same items "
                     f"(McNemar for accuracies, paired bootstrap for means; p < {ALPHA}); no bold = no significant winner.")
    if fp is not None:
        acc.notes.append(f"Δ vs FP: change against full precision; * = significant in the same paired test (p < {ALPHA}).")
    if show_config:
        acc.notes.append("config lists only the method options that differ between rows of a method; --format json has them all.")
    if len(avg_keys) > 1:
        acc.notes.append("avg: mean of " + ", ".join(f"{t} {m}" for t, m in avg_keys) + " (only when all are present).")

    return acc


def _cost_tables(entries, lead_cols, lead) -> list[Table]:
    """Calibration cost per quantized row; deployment size, latency and memory per row."""
    def mb(e, name):
        v = _stat(e, name)
        return _num(v, None if v is None else fmt_mb(v), note=e.note)

    def latency(e, name):
        v, s = _stat(e, name), _stat(e, f"{name}_spread")
        if v is None:
            return _num(None, note=e.note)
        cv = e.metrics.get(("deploy", f"{name}_cv"), {}).get("value")
        noisy = cv > NOISY if cv is not None else (s is not None and v and s / abs(v) > NOISY)
        return TableCell(fmt_num(v) + ("" if s is None else f" ± {fmt_num(s)}") + (f" (noisy, CV {cv:.0%})" if noisy and cv is not None
                                                                             else " (noisy)" if noisy else ""), float(v))

    def text(e, name):
        v = _stat(e, name)
        return TableCell(MISSING, None, note=e.note) if v is None else TableCell(str(v), str(v))

    quant = [e for e in entries if not e.is_fp]
    cost = Table("Calibration cost", lead_cols + ["calibration time (s)", "calibration peak memory (MB)"],
                 [lead(e) + [_num(_stat(e, "calib_seconds"), note=e.note), mb(e, "calib_peak_bytes")] for e in quant])  # fmt: skip
    cost.notes.append("Peak memory while quantizing: the whole process's peak RSS on a CPU (model, calibration set and "
                      "Python included), peak CUDA memory allocated on a GPU.")
    deploy = Table(
        "Deployment",
        lead_cols + ["model bytes as deployed (MB)", "prefill (ms, median ± IQR)", "decode (tok/s, median ± IQR)",
                     "inference peak memory (MB)", "kernel", "device"],
        [lead(e) + [mb(e, "model_bytes"), latency(e, "prefill_ms"), latency(e, "decode_tok_s"), mb(e, "infer_peak_bytes"),
                    text(e, "kernel"), text(e, "device")] for e in entries],
    )  # fmt: skip
    deploy.notes.append("Latency belongs to a format, not a method: each format (bits, group, kernel, dtype, batch) is timed "
                        "once per model, its repeats interleaved with the other formats' so that load hits them alike, and "
                        "shown on every method's row of that format.")
    deploy.notes.append(f"(noisy): the coefficient of variation over the timed repeats is above {NOISY:.0%} (or, for figures "
                        f"stored without it, the IQR is above {NOISY:.0%} of the median). Compare latency only between rows "
                        "of the same kernel and device.")
    return [cost, deploy]


def _seed_spread(entries: list[Entry], head: list) -> Table | None:
    """Rows that differ only in their calibration set (bench run --seeds): mean ± standard deviation of
    each headline metric across the sets, beside the per-set rows of the accuracy table."""
    import statistics

    groups: dict[tuple, list[Entry]] = {}
    for e in entries:
        if not e.is_fp:
            groups.setdefault((e.method, e.fmt, e.opts_key), []).append(e)
    multi = {k: es for k, es in groups.items() if len(es) > 1}
    if not multi or not head:
        return None
    rows = []
    for (method, fmt, _), es in multi.items():
        row = [TableCell(method, method), TableCell(fmt, fmt)]
        for key in head:
            vals = [e.metrics[key]["value"] for e in es if e.metrics.get(key, {}).get("status") == "ok"]
            row.append(_num(statistics.fmean(vals), f"{fmt_num(statistics.fmean(vals))} ± {fmt_num(statistics.stdev(vals))} "
                                                    f"({len(vals)} sets)") if len(vals) > 1 else TableCell(note="fewer than 2 sets"))
        rows.append(row)
    t = Table("Spread across calibration sets", ["method", "format"] + [f"{k[0]} {k[1]}" for k in head], rows)
    t.notes.append("Mean ± standard deviation over the calibration sets (bench run --seeds) of rows that differ only in "
                   "their calibration set; the accuracy table has each set's row.")
    return t


# -- header ------------------------------------------------------------------------------------
def _calib_line(manifest: dict | None) -> str:
    if not manifest:
        return "manifest not recorded"
    t = manifest.get("tokens") or {}
    valid = t.get("valid") or 0
    share = (t.get("vision", 0) / valid) if valid else 0
    return (f"{manifest.get('n_samples', '?')} samples of {manifest.get('source', '?')}, seed {manifest.get('seed', '?')}, "
            f"{valid} tokens (vision {share:.0%}, text {1 - share:.0%}, answer {t.get('answer', '?')})")


def _header(rows: list[dict]) -> dict:
    calib, envs, kernels = {}, {}, {}
    for r in rows:
        if not _is_fp(r) and r["method"] != FORMAT_METHOD and r.get("calib_hash"):
            if calib.get(r["calib_hash"]) is None:
                calib[r["calib_hash"]] = r.get("calib_manifest")
        if r.get("env"):
            envs[json.dumps(r["env"], sort_keys=True)] = r["env"]
        if r.get("kernel") or r.get("prefill_ms") is not None:
            kernels[(r.get("kernel") or "unlabelled", r.get("device") or "unknown device")] = None
    return {
        "models": sorted({r["model"] for r in rows}),
        "calibration": [{"hash": h, "manifest": m, "summary": _calib_line(m)} for h, m in sorted(calib.items())],
        "environments": [envs[k] for k in sorted(envs)],
        "kernels": [f"{k} on {d}" for k, d in sorted(kernels)],
        "latency_note": (
            "Prefill latency is the median over repeated timed runs ± their interquartile range; decode is generated "
            "tokens per second ± IQR. Each figure names its kernel and dtype (e.g. int4pack[bf16]; dequant[...] "
            "unpacks to bf16 and measures bf16 speed, not low-bit speed): compare latency and memory only between "
            "rows with the same kernel and device."
        ),
    }


def _env_line(env: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(env.items()) if v is not None)


def _footnotes(tables: list[Table]) -> list[str]:
    notes: list[str] = []
    for t in tables:
        for row in t.rows:
            for c in row:
                if c.note and c.value is None and c.note != "not run" and c.note not in notes:
                    notes.append(c.note)
    return notes


# -- markdown ----------------------------------------------------------------------------------
def _md_text(s: str) -> str:
    # Escape HTML (GitHub renders raw HTML in Markdown) and the pipe that would split a table cell.
    return escape(str(s), quote=False).replace("|", "\\|").replace("\n", " ")


def _row_texts(row: list[TableCell], notes: list[str], esc, bold, footnote) -> list[str]:
    """A row's cells as text in one markup: escaped, best in bold, a missing value's footnote number."""
    out = []
    for c in row:
        text = bold(esc(c.text)) if c.best else esc(c.text)
        out.append(text + (footnote(notes.index(c.note) + 1) if c.note and c.value is None and c.note in notes else ""))
    return out


def _md_table(t: Table, notes: list[str]) -> str:
    out = [f"### {_md_text(t.title)}", "", "| " + " | ".join(_md_text(c) for c in t.columns) + " |",
           "|" + "|".join("---" for _ in t.columns) + "|"]  # fmt: skip
    for row in t.rows:
        cells = _row_texts(row, notes, _md_text, lambda s: f"**{s}**", lambda i: f" [{i}]")
        out.append("| " + " | ".join(cells) + " |")
    out += [""] + [f"_{_md_text(n)}_" for n in t.notes]
    return "\n".join(out)


def _render_md(header, boards) -> str:
    out = ["# ptqbench leaderboard", "", f"- **Models:** {_md_text(', '.join(header['models']))}"]
    out += [f"- **Calibration** `{_md_text(c['hash'])}`: {_md_text(c['summary'])}" for c in header["calibration"]]
    out += [f"- **Environment:** {_md_text(_env_line(e))}" for e in header["environments"]]
    out += [f"- **Latency:** {_md_text(header['latency_note'])} Kernels: {_md_text('; '.join(header['kernels']) or 'none recorded')}.",
            f"- {MISSING} = not run or failed (a numbered footnote gives the error); missing values are never shown as 0.", ""]  # fmt: skip
    for model, tables in boards.items():
        notes = _footnotes(tables)
        out += [f"## {_md_text(model)}", ""]
        for t in tables:
            out += [_md_table(t, notes), ""]
        out += [f"{i}. {_md_text(n)}" for i, n in enumerate(notes, 1)] + [""]
    return "\n".join(out)


# -- latex -------------------------------------------------------------------------------------
_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
        "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}"}


def tex_escape(s) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(s))


def _tex_table(t: Table, model: str, notes: list[str]) -> str:
    spec = "l" * min(3, len(t.columns)) + "r" * max(0, len(t.columns) - 3)
    out = [r"\begin{table}[t]", r"\centering", r"\small", rf"\caption{{{tex_escape(model)}: {tex_escape(t.title)}}}",
           rf"\begin{{tabular}}{{{spec}}}", r"\toprule", " & ".join(tex_escape(c) for c in t.columns) + r" \\", r"\midrule"]
    for row in t.rows:
        cells = _row_texts(row, notes, tex_escape, lambda s: rf"\textbf{{{s}}}", lambda i: rf"\textsuperscript{{{i}}}")
        out.append(" & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    if t.notes:
        out.append(r"\par\smallskip\footnotesize " + " ".join(tex_escape(n) for n in t.notes))
    out.append(r"\end{table}")
    return "\n".join(out)


def _render_latex(header, boards) -> str:
    out = ["% ptqbench leaderboard: booktabs tables (\\usepackage{booktabs}), one per \\input-able block.",
           "% Models: " + tex_escape(", ".join(header["models"]))]
    for model, tables in boards.items():
        notes = _footnotes(tables)
        picked = [t for t in tables if t.title in ("Accuracy", "Spread across calibration sets", "Calibration cost", "Deployment",
                                                   SUMMARY)]
        out += ["", *(_tex_table(t, model, notes) + "\n" for t in picked)]
        if notes:
            out.append("% notes: " + tex_escape("; ".join(f"{i}. {n}" for i, n in enumerate(notes, 1))).replace("\n", " "))
    return "\n".join(out) + "\n"


# -- csv ---------------------------------------------------------------------------------------
CSV_COLUMNS = ("model", "method", "method_options", "bits", "group_size", "sym", "calib_hash", "task", "metric", "value",
               "n", "ci_low", "ci_high", "status", "error", "cell_id", "unit", "unit_json", "kernel", "device", "model_bytes",
               "prefill_ms", "prefill_ms_spread", "decode_tok_s", "decode_tok_s_spread", "infer_peak_bytes",
               "calib_seconds", "calib_peak_bytes", "run_id")


def _render_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        vals = []
        for c in CSV_COLUMNS:
            v = r.get(c)
            if c == "error" and v:
                v = str(v).splitlines()[0]
            vals.append(json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else ("" if v is None else v))
        w.writerow(vals)
    return buf.getvalue()


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points (size, accuracy) not beaten by a smaller-or-equal, at-least-as-accurate one."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


# -- html --------------------------------------------------------------------------------------
def _plots(entries: list[Entry]) -> list[Markup]:
    """The page's figures (matplotlib, inline SVG): per headline metric accuracy vs bits; the first one
    against model size; calibration time per cell; decode throughput per format."""
    from ptqbench.leaderboard import plots

    out = []
    heads = sorted({k for e in entries for k in e.metrics if k[0] not in ("deploy", "recon") and "/" not in k[1]})
    ok = lambda e, k: k in e.metrics and e.metrics[k]["status"] == "ok"  # noqa: E731
    for key in heads:
        fp = next((e for e in entries if e.is_fp and ok(e, key)), None)
        series: dict[str, list] = {}
        for e in entries:
            if not e.is_fp and ok(e, key):
                r = e.metrics[key]
                series.setdefault(e.series, []).append((e.bits, r["value"], r.get("ci_low"), r.get("ci_high")))
        r = fp.metrics[key] if fp else None
        out.append(plots.accuracy_vs_bits(series, fp=(r["value"], r.get("ci_low"), r.get("ci_high")) if r else None,
                                          title=f"{key[0]} {key[1]} vs weight bits (95% intervals)", ylabel=f"{key[0]} {key[1]}",
                                          higher_is_better=higher_is_better(key[1])))
    if heads:
        key = heads[0]
        pts = [dict(label=f"{e.method} {e.fmt}" if not e.is_fp else e.fmt, method=e.method, size_mb=_stat(e, "model_bytes") / 1e6,
                    value=e.metrics[key]["value"], lo=e.metrics[key].get("ci_low"), hi=e.metrics[key].get("ci_high"), fp=e.is_fp)
               for e in entries if ok(e, key) and _stat(e, "model_bytes")]
        out.append(plots.pareto(pts, title=f"{key[0]} {key[1]} vs model size", ylabel=f"{key[0]} {key[1]}",
                                higher_is_better=higher_is_better(key[1])))
    cost = [(f"{e.method} {e.fmt}", _stat(e, "calib_seconds")) for e in entries if not e.is_fp and _stat(e, "calib_seconds")]
    out.append(plots.cost_bars(cost, title="Calibration time per cell", xlabel="seconds"))
    seen, tput = set(), []
    for e in entries:
        kernel, v = _stat(e, "kernel"), _stat(e, "decode_tok_s")
        label = f"{e.fmt} {kernel or ''}".strip()  # one bar per format: every method of it shares the figure
        if v is not None and label not in seen:
            seen.add(label)
            tput.append((label, v, _stat(e, "decode_tok_s_spread")))
    out.append(plots.throughput_bars(tput, title="Decode throughput per format", xlabel="tokens / s (median; bar: interquartile range)"))
    return [Markup(p) for p in out if p]


HTML = jinja2.Environment(autoescape=True).from_string("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ptqbench leaderboard</title>
<style>
body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:.5em 0 1em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}td.t,th{text-align:left}th{background:#f2f2f2;cursor:pointer}
th:after{content:" ⇅";color:#aaa}td.best{font-weight:bold;background:#e6f4e6}td.missing{color:#999}
.note{color:#555;font-size:.9em}.plots svg{max-width:100%;height:auto;display:block;margin:1em 0}
</style></head><body>
<h1>ptqbench leaderboard</h1>
{% for model, b in boards.items() %}<h2>{{ model }}</h2>
{% for t in b.tables %}{% if loop.index == 2 %}<details><summary>Per-family breakdown, diagnostics, cost and deployment</summary>{% endif %}
<h3>{{ t.title }}</h3><table class="sortable"><thead><tr>
{% for c in t.columns %}<th>{{ c }}</th>{% endfor %}</tr></thead><tbody>
{% for row in t.rows %}<tr>{% for c in row %}<td class="{{ 't' if c.value is string }}{{ ' best' if c.best }}{{ ' missing' if c.value is none }}"
{%- if c.value is not none %} data-v="{{ c.value }}"{% endif %}{% if c.note %} title="{{ c.note }}"{% endif %}>{{ c.text }}
{%- if c.note and c.value is none and c.note in b.notes %}<sup>{{ b.notes.index(c.note) + 1 }}</sup>{% endif %}</td>{% endfor %}</tr>
{% endfor %}</tbody></table>{% for n in t.notes %}<p class="note">{{ n }}</p>{% endfor %}
{% if loop.last and loop.length > 1 %}</details>{% endif %}{% endfor %}
{% if b.notes %}<ol class="note">{% for n in b.notes %}<li>{{ n }}</li>{% endfor %}</ol>{% endif %}
<div class="plots">{% for p in b.plots %}{{ p }}{% endfor %}</div>
{% endfor %}
<h2>Provenance</h2>
<p><b>Models:</b> {{ h.models|join(", ") }}</p>
{% for c in h.calibration %}<p><b>Calibration</b> <code>{{ c.hash }}</code>: {{ c.summary }}</p>{% endfor %}
{% for e in h.environments %}<p><b>Environment:</b> {{ env_line(e) }}</p>{% endfor %}
<p><b>Latency:</b> {{ h.latency_note }} Kernels: {{ h.kernels|join("; ") or "none recorded" }}.</p>
<p class="note">{{ missing }} = not run or failed (hover or see the numbered note for the error); missing values are never shown as 0. Click a column header to sort.</p>
<script>
document.querySelectorAll("table.sortable th").forEach((th, i) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0], asc = th.dataset.dir !== "asc";
  th.dataset.dir = asc ? "asc" : "desc";
  const key = tr => { const v = tr.cells[i].dataset.v; return v === undefined ? null : (isNaN(+v) ? v : +v); };
  [...body.rows].sort((a, b) => {
    const x = key(a), y = key(b);
    if (x === null || y === null) return (x === null) - (y === null);  // missing always last
    return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
  }).forEach(r => body.appendChild(r));
}));
</script></body></html>
""")


def _render_html(header, boards, entries_by_model) -> str:
    ctx = {model: {"tables": tables, "notes": _footnotes(tables), "plots": _plots(entries_by_model[model])}
           for model, tables in boards.items()}
    return HTML.render(h=header, boards=ctx, env_line=_env_line, missing=MISSING)


# -- json --------------------------------------------------------------------------------------
def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # keep the output strict JSON
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def _render_json(header, boards, rows, cells) -> str:
    def cell(x: TableCell) -> dict:
        d = {"value": x.value, "text": x.text, "best": x.best}
        if x.n is not None:
            d["n"] = x.n
        if x.ci is not None:
            d["ci_low"], d["ci_high"] = x.ci
        return {**d, **({"note": x.note} if x.note else {})}

    tables = {model: [{"title": t.title, "columns": t.columns, "rows": [{c: cell(x) for c, x in zip(t.columns, row)} for row in t.rows]}
                      for t in ts] for model, ts in boards.items()}  # fmt: skip
    doc = {"format": "ptqbench-leaderboard-v2", "header": header, "tables": tables, "rows": rows, "cells": cells}
    return json.dumps(_clean(doc), indent=1, sort_keys=True, default=str, allow_nan=False) + "\n"


SUMMARY = "Summary across models"


def _summary(entries_by_model: dict[str, list[Entry]]) -> Table:
    """Each model's first headline score (value [interval]) per method and format, side by side."""
    models = sorted(entries_by_model)
    heads = {m: next(iter(sorted({k for e in es for k in e.metrics if k[0] not in ("deploy", "recon") and "/" not in k[1]})), None)
             for m, es in entries_by_model.items()}
    keys = sorted({(e.method, e.fmt) for es in entries_by_model.values() for e in es},
                  key=lambda k: (not k[1].startswith("FP"), k[1], k[0]))
    rows = []
    for method, fmt in keys:
        row = [TableCell(method, method), TableCell(fmt, fmt)]
        for m in models:
            e = next((e for e in entries_by_model[m] if (e.method, e.fmt) == (method, fmt)), None)
            row.append(_score_cell(e, heads[m], True) if e is not None and heads[m] else TableCell(note="not run"))
        rows.append(row)
    cols = ["method", "format"] + [f"{m}: {' '.join(heads[m]) if heads[m] else 'no task'}" for m in models]
    return Table(SUMMARY, cols, rows, ["Each model's first task metric, value [95% interval] n = items; the model's own "
                                       "section has every metric and the significance marks."])


def render(store_rows: list[dict], format: str = "md", cells: list[dict] | None = None, units: list[dict] | None = None) -> str:
    """Leaderboard text from ResultsStore.rows() (and .cells(), for failed/unfinished cells, and .units(),
    for the per-item outcomes the significance marks compare)."""
    if format not in FORMATS:
        raise one_of("format", format, FORMATS)
    rows, cells = list(store_rows), list(cells or [])
    if format == "csv":
        return _render_csv(rows)
    header = _header(rows)
    boards, entries_by_model = {}, {}
    for model in sorted({r["model"] for r in rows} | {c["model"] for c in cells}):
        entries = _entries([r for r in rows if r["model"] == model], [c for c in cells if c["model"] == model], list(units or []))
        entries_by_model[model], boards[model] = entries, _tables(entries)
    header["models"] = sorted(boards)
    if len(boards) > 1:  # several models: a summary first, one column per model
        summary = _summary(entries_by_model)
        boards, entries_by_model = {SUMMARY: [summary], **boards}, {SUMMARY: [], **entries_by_model}
    if format == "md":
        return _render_md(header, boards)
    if format == "html":
        return _render_html(header, boards, entries_by_model)
    if format == "latex":
        return _render_latex(header, boards)
    return _render_json(header, boards, rows, cells)
