"""Leaderboard generator: store rows -> Markdown, one self-contained HTML file, or JSON.

All three formats are built from the same Table objects, so they show the same numbers. Per model:
(a) accuracy: rows = method x bits (+ full precision), one column per task/metric, the average of the
    top-level higher-is-better metrics and its delta vs full precision; the best quantized value per
    column *among rows of the same bit width* is marked (across bit widths the widest would always win);
(b) cost: calibration time and peak memory; (c) deployment: size, latency, throughput, memory, kernel.
A value that was not run or failed is shown as "—" (with the error in a title/footnote), never as 0.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from html import escape

import jinja2
from markupsafe import Markup

from ptqbench.errors import one_of

FORMATS = ("md", "html", "json")
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
class Cell:
    text: str = MISSING
    value: float | str | None = None  # raw value, for sorting and for JSON; None = missing
    best: bool = False
    note: str = ""  # why it is missing (failed + error); becomes a title and a footnote


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Cell]]
    notes: list[str] = field(default_factory=list)


@dataclass
class Entry:
    """One leaderboard row: every store row of one (method, options, bits, group, sym, calib)."""

    method: str
    bits: int
    config: str
    series: str  # label without the bit width: one line in the accuracy-vs-bits plot
    is_fp: bool
    metrics: dict = field(default_factory=dict)  # (task, metric) -> store row
    note: str = ""  # cell-level failure


def _num(v, text=None, note="") -> Cell:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return Cell(note=note)  # the note (why it is missing) only matters when there is no value
    return Cell(text if text is not None else fmt_num(v), float(v))


def _opts(o) -> dict:
    return json.loads(o) if isinstance(o, str) else dict(o or {})


def _is_fp(r) -> bool:
    return str(r["method"]).lower() in FP_METHODS or int(r["bits"]) >= 16


def _failure(error) -> str:
    """One line for a table note: errors are stored with their traceback (kept in full in JSON)."""
    first = next((line.strip() for line in str(error or "").splitlines() if line.strip()), "no error recorded")
    return "failed: " + (first if len(first) <= 300 else first[:299] + "…")


def _entries(rows: list[dict], cells: list[dict]) -> list[Entry]:
    quant = [r for r in rows + cells if not _is_fp(r)]
    several_calibs = len({r.get("calib_hash") or "" for r in quant}) > 1
    # Runners record every option, defaults included: label a row only with the options that
    # differ between rows of its method, the rest is noise (and stays in the JSON).
    configs: dict[str, list[dict]] = {}
    for r in quant:
        configs.setdefault(r["method"], []).append(_opts(r.get("method_options")))
    varying = {m: {k for o in os_ for k in o if len({json.dumps(x.get(k, "<unset>")) for x in os_}) > 1}
               for m, os_ in configs.items()}  # fmt: skip
    entries: dict[tuple, Entry] = {}

    def entry(r) -> Entry:
        fp, opts = _is_fp(r), _opts(r.get("method_options"))
        gs, sym, calib = int(r.get("group_size") or 0), bool(r.get("sym")), r.get("calib_hash") or ""
        key = (r["method"], int(r["bits"])) if fp else (r["method"], json.dumps(opts, sort_keys=True), int(r["bits"]), gs, sym, calib)
        if key not in entries:
            parts = [] if fp else ["per-channel" if gs == -1 else f"g{gs}", "sym" if sym else "asym"]
            parts += [f"{k}={v}" for k, v in sorted(opts.items()) if k in varying.get(r["method"], ())]
            parts += [f"calib {calib[:8]}"] if several_calibs and not fp else []
            series = " ".join([r["method"], *parts])
            entries[key] = Entry(r["method"], int(r["bits"]), " ".join(parts), series, fp)
        return entries[key]

    for r in rows:
        entry(r).metrics[(r["task"], r["metric"])] = r
    for c in cells:
        if c["status"] == "failed":
            entry(c).note = _failure(c.get("error"))
        elif c["status"] == "running" and not entry(c).metrics:
            entry(c).note = f"not finished (started {c.get('started_at')}, attempt {c.get('attempts')})"
    # Full precision first, then widest bits first, then by method name.
    return sorted(entries.values(), key=lambda e: (not e.is_fp, -e.bits, e.method, e.config))


def _stat(e: Entry, name: str):
    """A per-cell number (cost, latency): the deployment's own row first (its model size is the deployed
    model's), then the first other row that has it."""
    rows = sorted(e.metrics.values(), key=lambda r: r.get("task") != "deploy")
    return next((r[name] for r in rows if r.get(name) is not None), None)


def _mark_best(table: Table, entries: list[Entry], col: int, higher: bool):
    by_bits: dict[int, list[Cell]] = {}
    for e, row in zip(entries, table.rows):
        if not e.is_fp and row[col].value is not None:
            by_bits.setdefault(e.bits, []).append(row[col])
    for group in by_bits.values():
        if len(group) < 2:
            continue  # a lone method at a bit width is not "best" of anything
        shown = [float(c.text) for c in group]  # compare what the reader sees, so ties are ties
        best = max(shown) if higher else min(shown)
        for c, s in zip(group, shown):
            c.best = s == best


def _tables(entries: list[Entry]) -> list[Table]:
    # "deploy" rows only carry a cell's latency figures (a full-precision cell without tasks): not accuracy.
    cols = sorted({k for e in entries for k in e.metrics if k[0] != "deploy"}, key=lambda k: (k[0], "/" in k[1], k[1]))
    avg_cols = [k for k in cols if "/" not in k[1] and higher_is_better(k[1])]
    fp = next((e for e in entries if e.is_fp), None)
    lead = lambda e: [Cell(e.method, e.method, note=e.note), Cell(str(e.bits), e.bits), Cell(e.config, e.config)]  # noqa: E731

    def metric_cell(e: Entry, k) -> Cell:
        r = e.metrics.get(k)
        if r is None:
            return Cell(note=e.note or "not run")
        if r["status"] != "ok":
            return Cell(note=_failure(r.get("error")))
        return _num(r["value"])

    def avg(e: Entry):
        vals = [e.metrics[k]["value"] for k in avg_cols if k in e.metrics and e.metrics[k]["status"] == "ok"]
        return sum(vals) / len(vals) if avg_cols and len(vals) == len(avg_cols) else None  # partial avg misleads

    fp_avg = avg(fp) if fp else None
    header = [f"{t} {m}" for t, m in cols]
    if avg_cols:
        header.append("avg")
    if avg_cols and fp_avg is not None:
        header.append("Δ avg vs FP")
    acc_rows = []
    for e in entries:
        row = lead(e) + [metric_cell(e, k) for k in cols]
        if avg_cols:
            a = avg(e)
            row.append(_num(a, note=e.note or "some averaged metric is missing"))
            if fp_avg is not None:
                row.append(_num(None if a is None else a - fp_avg, None if a is None else f"{a - fp_avg:+.4f}", note=e.note))
        acc_rows.append(row)
    acc = Table("Accuracy", ["method", "bits", "config", *header], acc_rows)
    for i, (t, m) in enumerate(cols):
        _mark_best(acc, entries, 3 + i, higher_is_better(m))
    for i in range(len(header) - len(cols)):
        _mark_best(acc, entries, 3 + len(cols) + i, True)
    acc.notes.append("Bold: best quantized value in its column among rows of the same bit width "
                     "(higher is better for accuracy-like metrics; lower for nll/loss/error/latency/memory).")  # fmt: skip
    acc.notes.append("config lists only the method options that differ between rows of a method; --format json has them all.")
    if avg_cols:
        acc.notes.append("avg: mean of " + ", ".join(f"{t} {m}" for t, m in avg_cols) + " (only when all are present).")

    def mb(e, name):
        v = _stat(e, name)
        return _num(v, None if v is None else fmt_mb(v), note=e.note)

    def spread(e, name):
        v, s = _stat(e, name), _stat(e, f"{name}_spread")
        return _num(v, None if v is None else fmt_num(v) + ("" if s is None else f" ± {fmt_num(s)}"), note=e.note)

    def text(e, name):
        v = _stat(e, name)
        return Cell(MISSING, None, note=e.note) if v is None else Cell(str(v), str(v))

    cost = Table("Calibration cost", ["method", "bits", "config", "calibration time (s)", "calibration peak memory (MB)"],
                 [lead(e) + [_num(_stat(e, "calib_seconds"), note=e.note), mb(e, "calib_peak_bytes")] for e in entries])  # fmt: skip
    deploy = Table(
        "Deployment",
        ["method", "bits", "config", "model size (MB)", "prefill (ms, median ± spread)", "decode (tok/s ± spread)",
         "peak memory (MB)", "kernel", "device"],
        [lead(e) + [mb(e, "model_bytes"), spread(e, "prefill_ms"), spread(e, "decode_tok_s"), mb(e, "infer_peak_bytes"),
                    text(e, "kernel"), text(e, "device")] for e in entries],
    )  # fmt: skip
    return [acc, cost, deploy]


def _plot_metric(acc: Table):
    """Column the plots use: the average, else the first higher-is-better metric."""
    names = acc.columns[3:]
    if "avg" in names:
        return 3 + names.index("avg"), "avg"
    for i, n in enumerate(names):
        if higher_is_better(n.split(" ", 1)[-1]):
            return 3 + i, n
    return None, None


# -- header ------------------------------------------------------------------------------------
def _header(rows: list[dict]) -> dict:
    calib, envs, kernels = {}, {}, {}
    for r in rows:
        if not _is_fp(r) and r.get("calib_hash"):
            if calib.get(r["calib_hash"]) is None:
                calib[r["calib_hash"]] = r.get("calib_manifest")
        if r.get("env"):
            envs[json.dumps(r["env"], sort_keys=True)] = r["env"]
        if r.get("kernel") or r.get("prefill_ms") is not None:
            kernels[(r.get("kernel") or "unlabelled", r.get("device") or "unknown device")] = None
    return {
        "models": sorted({r["model"] for r in rows}),
        "calibration": [{"hash": h, "manifest": m} for h, m in sorted(calib.items())],
        "environments": [envs[k] for k in sorted(envs)],
        "kernels": [f"{k} on {d}" for k, d in sorted(kernels)],
        "latency_note": (
            "Prefill latency is the median over repeated timed runs ± the spread the harness recorded; decode is "
            "generated tokens per second ± spread. Each number was measured with the kernel named in its row "
            "(e.g. a dequantize-then-fp16-matmul path measures fp16 speed, not low-bit speed): compare latency "
            "and memory only between rows with the same kernel and device."
        ),
    }


def _env_line(env: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(env.items()) if v is not None)


# -- markdown ----------------------------------------------------------------------------------
def _md_text(s: str) -> str:
    # Escape HTML (GitHub renders raw HTML in Markdown) and the pipe that would split a table cell.
    return escape(str(s), quote=False).replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table, notes: list[str]) -> str:
    out = [f"### {_md_text(t.title)}", "", "| " + " | ".join(_md_text(c) for c in t.columns) + " |",
           "|" + "|".join("---" for _ in t.columns) + "|"]  # fmt: skip
    for row in t.rows:
        cells = []
        for c in row:
            s = _md_text(c.text)
            if c.best:
                s = f"**{s}**"
            if c.note and c.value is None and c.note != "not run":
                if c.note not in notes:
                    notes.append(c.note)
                s += f" [{notes.index(c.note) + 1}]"
            cells.append(s)
        out.append("| " + " | ".join(cells) + " |")
    out += [""] + [f"_{_md_text(n)}_" for n in t.notes]
    return "\n".join(out)


def _render_md(header, boards) -> str:
    out = ["# ptqbench leaderboard", "", f"- **Models:** {_md_text(', '.join(header['models']))}"]
    for c in header["calibration"]:
        manifest = json.dumps(c["manifest"], sort_keys=True) if c["manifest"] is not None else "not recorded"
        out.append(f"- **Calibration** `{_md_text(c['hash'])}`: {_md_text(manifest)}")
    out += [f"- **Environment:** {_md_text(_env_line(e))}" for e in header["environments"]]
    out += [f"- **Latency:** {_md_text(header['latency_note'])} Kernels: {_md_text('; '.join(header['kernels']) or 'none recorded')}.",
            f"- {MISSING} = not run or failed (a numbered footnote gives the error); missing values are never shown as 0.", ""]  # fmt: skip
    for model, tables in boards.items():
        notes: list[str] = []
        out += [f"## {_md_text(model)}", ""]
        for t in tables:
            out += [_md_table(t, notes), ""]
        out += [f"{i}. {_md_text(n)}" for i, n in enumerate(notes, 1)] + [""]
    return "\n".join(out)


# -- html --------------------------------------------------------------------------------------
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
W, H, L, R, T, B = 640, 340, 60, 170, 20, 40  # svg size and margins (legend on the right)


def _scale(lo, hi, a, b):
    if hi - lo < 1e-12:
        lo, hi = lo - 1, hi + 1
    pad = (hi - lo) * 0.06
    lo, hi = lo - pad, hi + pad
    return lambda v: a + (v - lo) / (hi - lo) * (b - a), lo, hi


def _axes(ylo, yhi, y, xlabel, ylabel) -> list[str]:
    out = [f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="#444"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="#444"/>',
           f'<text x="{(L + W - R) / 2}" y="{H - 5}" text-anchor="middle">{escape(xlabel)}</text>',
           f'<text x="12" y="{(T + H - B) / 2}" transform="rotate(-90 12 {(T + H - B) / 2})" text-anchor="middle">{escape(ylabel)}</text>']  # fmt: skip
    for i in range(5):
        v = ylo + (yhi - ylo) * i / 4
        out.append(f'<text x="{L - 4}" y="{y(v) + 4:.1f}" text-anchor="end">{fmt_num(v)}</text>')
    return out


def _svg(body: list[str], title: str) -> Markup:
    return Markup(f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img">'
                  f"<title>{escape(title)}</title>{''.join(body)}</svg>")  # fmt: skip


def _plot_bits(entries, acc: Table) -> Markup | None:
    col, name = _plot_metric(acc)
    pts = [(e, row[col].value) for e, row in zip(entries, acc.rows) if col is not None and row[col].value is not None]
    quant = [(e, v) for e, v in pts if not e.is_fp]
    if not quant:
        return None
    bits = sorted({e.bits for e, _ in quant})
    xs = {b: L + 30 + i * (W - R - L - 60) / max(1, len(bits) - 1) for i, b in enumerate(bits)}
    y, lo, hi = _scale(min(v for _, v in pts), max(v for _, v in pts), H - B, T)
    body = _axes(lo, hi, y, "bits", name)
    body += [f'<text x="{x:.1f}" y="{H - B + 16}" text-anchor="middle">{b}</text>' for b, x in xs.items()]
    series = sorted({e.series for e, _ in quant})
    for e, v in pts:
        if e.is_fp:  # full precision: a dashed reference line, listed under the methods
            body.append(f'<line x1="{L}" x2="{W - R}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#000" stroke-dasharray="5 4">'
                        f"<title>{escape(e.method)}: {fmt_num(v)}</title></line>"
                        f'<text x="{W - R + 10}" y="{T + 16 * len(series) + 9}">- - {escape(e.method[:20])}</text>')  # fmt: skip
            break
    for i, s in enumerate(series):
        color = COLORS[i % len(COLORS)]
        sp = sorted((e.bits, v, e) for e, v in quant if e.series == s)
        body.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{" ".join(f"{xs[b]:.1f},{y(v):.1f}" for b, v, _ in sp)}"/>')
        body += [f'<circle cx="{xs[b]:.1f}" cy="{y(v):.1f}" r="4" fill="{color}"><title>{escape(s)} w{b}: {fmt_num(v)}</title></circle>' for b, v, _ in sp]
        body.append(f'<rect x="{W - R + 10}" y="{T + 16 * i}" width="10" height="10" fill="{color}"/>'
                    f'<text x="{W - R + 24}" y="{T + 16 * i + 9}">{escape(s[:24])}</text>')  # fmt: skip
    return _svg(body, f"{name} vs bits per method")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points (size, accuracy) not beaten by a smaller-or-equal, at-least-as-accurate one."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _plot_pareto(entries, acc: Table, deploy: Table) -> Markup | None:
    col, name = _plot_metric(acc)
    pts = [(e, d[3].value, a[col].value) for e, a, d in zip(entries, acc.rows, deploy.rows)
           if col is not None and a[col].value is not None and d[3].value is not None]  # fmt: skip
    if not pts:
        return None
    x, xlo, xhi = _scale(min(p[1] for p in pts) / 1e6, max(p[1] for p in pts) / 1e6, L, W - R)
    y, lo, hi = _scale(min(p[2] for p in pts), max(p[2] for p in pts), H - B, T)
    body = _axes(lo, hi, y, "model size (MB)", name)
    body += [f'<text x="{x(xlo + (xhi - xlo) * i / 4):.1f}" y="{H - B + 16}" text-anchor="middle">{fmt_num(xlo + (xhi - xlo) * i / 4)}</text>' for i in range(5)]
    front = pareto_front([(p[1], p[2]) for p in pts])
    line = " ".join(f"{x(pts[i][1] / 1e6):.1f},{y(pts[i][2]):.1f}" for i in front)
    body.append(f'<polyline fill="none" stroke="#d62728" stroke-width="2" points="{line}"/>')
    for i, (e, size, v) in enumerate(pts):
        on = i in front
        label = f"{e.method} w{e.bits} {e.config}".strip()
        body.append(f'<circle cx="{x(size / 1e6):.1f}" cy="{y(v):.1f}" r="{5 if on else 4}" fill="{"#d62728" if on else "none"}" '
                    f'stroke="{"#d62728" if on else "#777"}"><title>{escape(label)}: {fmt_num(v)}, {fmt_mb(size)} MB</title></circle>')  # fmt: skip
        if on:  # label the front; right-half labels grow leftwards so they stay inside the plot
            right = x(size / 1e6) > (L + W - R) / 2
            body.append(f'<text x="{x(size / 1e6) + (-7 if right else 7):.1f}" y="{y(v) - 6:.1f}" font-size="11" '
                        f'text-anchor="{"end" if right else "start"}">{escape(label[:28])}</text>')
    body.append(f'<text x="{W - R + 10}" y="{T + 9}" fill="#d62728">● Pareto front</text>')
    return _svg(body, f"Pareto front: {name} vs model size")


HTML = jinja2.Environment(autoescape=True).from_string("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ptqbench leaderboard</title>
<style>
body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:.5em 0 1em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}td.t,th{text-align:left}th{background:#f2f2f2;cursor:pointer}
th:after{content:" ⇅";color:#aaa}td.best{font-weight:bold;background:#e6f4e6}td.missing{color:#999}
.note{color:#555;font-size:.9em}pre{background:#f6f6f6;padding:.5em;overflow:auto;max-height:15em}svg text{font-size:12px}
</style></head><body>
<h1>ptqbench leaderboard</h1>
<p><b>Models:</b> {{ h.models|join(", ") }}</p>
{% for c in h.calibration %}<details><summary><b>Calibration</b> <code>{{ c.hash }}</code></summary>
<pre>{{ c.manifest|tojson(indent=1) if c.manifest is not none else "manifest not recorded" }}</pre></details>{% endfor %}
{% for e in h.environments %}<p><b>Environment:</b> {{ env_line(e) }}</p>{% endfor %}
<p><b>Latency:</b> {{ h.latency_note }} Kernels: {{ h.kernels|join("; ") or "none recorded" }}.</p>
<p class="note">{{ missing }} = not run or failed (hover or see the numbered note for the error); missing values are never shown as 0. Click a column header to sort.</p>
{% for model, b in boards.items() %}<h2>{{ model }}</h2>
{% for t in b.tables %}<h3>{{ t.title }}</h3><table class="sortable"><thead><tr>
{% for c in t.columns %}<th>{{ c }}</th>{% endfor %}</tr></thead><tbody>
{% for row in t.rows %}<tr>{% for c in row %}<td class="{{ 't' if c.value is string }}{{ ' best' if c.best }}{{ ' missing' if c.value is none }}"
{%- if c.value is not none %} data-v="{{ c.value }}"{% endif %}{% if c.note %} title="{{ c.note }}"{% endif %}>{{ c.text }}
{%- if c.note and c.value is none and c.note in b.notes %}<sup>{{ b.notes.index(c.note) + 1 }}</sup>{% endif %}</td>{% endfor %}</tr>
{% endfor %}</tbody></table>{% for n in t.notes %}<p class="note">{{ n }}</p>{% endfor %}{% endfor %}
{% if b.notes %}<ol class="note">{% for n in b.notes %}<li>{{ n }}</li>{% endfor %}</ol>{% endif %}
{% for p in b.plots %}{{ p }}{% endfor %}
{% endfor %}
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
    ctx = {}
    for model, tables in boards.items():
        notes = []
        for t in tables:
            for row in t.rows:
                for c in row:
                    if c.note and c.value is None and c.note != "not run" and c.note not in notes:
                        notes.append(c.note)
        entries = entries_by_model[model]
        plots = [p for p in (_plot_bits(entries, tables[0]), _plot_pareto(entries, tables[0], tables[2])) if p]
        ctx[model] = {"tables": tables, "notes": notes, "plots": plots}
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
    tables = {
        model: [{"title": t.title, "columns": t.columns,
                 "rows": [{c: {"value": x.value, "text": x.text, "best": x.best, **({"note": x.note} if x.note else {})}
                           for c, x in zip(t.columns, row)} for row in t.rows]} for t in ts]
        for model, ts in boards.items()
    }  # fmt: skip
    doc = {"format": "ptqbench-leaderboard-v1", "header": header, "tables": tables, "rows": rows, "cells": cells}
    return json.dumps(_clean(doc), indent=1, sort_keys=True, default=str, allow_nan=False) + "\n"


def render(store_rows: list[dict], format: str = "md", cells: list[dict] | None = None) -> str:
    """Leaderboard text from ResultsStore.rows() (and .cells(), for failed/unfinished cells)."""
    if format not in FORMATS:
        raise one_of("format", format, FORMATS)
    rows, cells = list(store_rows), list(cells or [])
    header = _header(rows)
    boards, entries_by_model = {}, {}
    for model in sorted({r["model"] for r in rows} | {c["model"] for c in cells}):
        entries = _entries([r for r in rows if r["model"] == model], [c for c in cells if c["model"] == model])
        entries_by_model[model], boards[model] = entries, _tables(entries)
    header["models"] = sorted(boards)
    if format == "md":
        return _render_md(header, boards)
    if format == "html":
        return _render_html(header, boards, entries_by_model)
    return _render_json(header, boards, rows, cells)
