"""Leaderboard figures: inline SVG that parses, carries its text escaped, is byte-identical for the same
data, has round accuracy ticks within [0, 1] and Pareto point labels that do not overlap."""

import itertools
import math
import re
import xml.etree.ElementTree as ET

import pytest
from matplotlib.text import Text

from ptqbench.leaderboard import plots as P

EVIL = 'a<b & "c" $x$ \\frac'
SERIES = {
    "gptq g128": [(2, 0.31, 0.27, 0.35), (3, 0.58, 0.54, 0.62), (4, 0.66, 0.62, 0.70), (8, 0.68, 0.64, 0.72)],
    "gptq g64": [(2, 0.36, 0.32, 0.40), (3, 0.60, 0.56, 0.64), (4, 0.67, 0.63, 0.71)],
    "rtn per-channel": [(2, 0.05, 0.03, 0.08), (3, 0.41, None, None), (4, 0.63, 0.59, 0.67)],
    "awq g128": [(3, 0.61, 0.57, 0.65), (4, 0.675, 0.635, 0.715)],
}


def points(series=SERIES, fp=True):
    """Pareto points of SERIES: same-bit-width points crowd at nearly the same size."""
    out = [{"label": f"{k.split()[0]} W{b} {k.split()[1]}", "method": k.split()[0], "size_mb": 4400 * b / 16 + 300 + 20 * i,
            "value": v, "lo": lo, "hi": hi, "fp": False}
           for i, (k, pts) in enumerate(sorted(series.items())) for b, v, lo, hi in pts]  # fmt: skip
    full = {"label": "FP (bfloat16)", "method": "fp", "size_mb": 4700.0, "value": 0.69, "lo": 0.65, "hi": 0.73, "fp": True}
    return out + ([full] if fp else [])


def calls(label="x"):
    """One call per public function, each with `label` in its title."""
    return {
        "accuracy_vs_bits": lambda: P.accuracy_vs_bits(SERIES, fp=(0.69, 0.65, 0.73), title=f"acc {label}", ylabel="vqa accuracy"),
        "pareto": lambda: P.pareto(points(), title=f"pareto {label}", ylabel="vqa accuracy"),
        "cost_bars": lambda: P.cost_bars([("gptq W4 g128", 312.5), ("rtn W4", 2.3)], title=f"cost {label}", xlabel="seconds"),
        "throughput_bars": lambda: P.throughput_bars([("W4 g64 int4pack[bf16]", 63.7, 4.5), ("FP", 41.2, None)],
                                                     title=f"tput {label}", xlabel="tokens / s"),
    }


def texts(svg: str) -> list[str]:
    root = ET.fromstring(svg)
    return ["".join(el.itertext()) for el in root.iter() if el.tag.endswith("}text")]


@pytest.mark.parametrize("name", sorted(calls()))
def test_inline_svg_parses_is_self_contained_and_deterministic(name):
    svg = calls()[name]()
    assert isinstance(svg, str) and svg.strip().startswith("<svg")
    assert "<?xml" not in svg and "DOCTYPE" not in svg and "<metadata" not in svg
    root = ET.fromstring(svg)
    refs = [v for el in root.iter() for k, v in el.attrib.items() if k.endswith("href")]
    assert all(r.startswith("#") for r in refs), refs  # nothing outside the page
    assert "<image" not in svg and "@import" not in svg and "url(http" not in svg
    assert svg == calls()[name](), "same data must give byte-identical SVG"


def test_text_present():
    acc = texts(P.accuracy_vs_bits(SERIES, fp=None, title="vqa accuracy vs weight bits", ylabel="vqa accuracy"))
    assert {"vqa accuracy vs weight bits", "vqa accuracy", "weight bits", "gptq g64", "awq g128"} <= set(acc)
    assert {"2", "3", "4", "8"} <= set(acc)  # the bit widths are the x ticks
    par = texts(P.pareto(points(), title="vqa vs size", ylabel="vqa accuracy"))
    assert {"vqa vs size", "vqa accuracy", "model size (MB)", "Pareto front", "FP (bfloat16)", "gptq W2 g128"} <= set(par)
    bars = texts(P.throughput_bars([("W4 g64 int4pack[bf16]", 63.7, 4.5)], title="Decode throughput", xlabel="tokens / s"))
    assert {"Decode throughput", "tokens / s", "W4 g64 int4pack[bf16]", "63.7"} <= set(bars)
    cost = texts(P.cost_bars([("gptq W4 g128", 312.5)], title="Calibration time", xlabel="seconds"))
    assert {"Calibration time", "seconds", "gptq W4 g128"} <= set(cost)


def test_titles_are_salted_apart():
    """Two figures on one page must not share element ids (the SVG hash salt includes the title)."""
    a, b = calls("one")["pareto"](), calls("two")["pareto"]()
    ids = lambda s: [el.get("id") for el in ET.fromstring(s).iter() if el.get("id")]
    assert ids(a) and len(set(ids(a))) == len(ids(a)) and not set(ids(a)) & set(ids(b))
    refs = re.findall(r'(?:href="#|url\(#)([^")]+)', a)
    assert refs and set(refs) <= set(ids(a))  # every reference resolves inside its own figure


def decimals(v: float) -> int:
    return next(d for d in range(12) if math.isclose(v, round(v, d), abs_tol=1e-9))


@pytest.mark.parametrize("series,fp", [
    (SERIES, (0.69, 0.65, 0.73)),
    ({"rtn": [(4, 0.6517, None, None), (8, 0.6523, None, None)]}, None),  # a tiny range
    ({"rtn": [(4, 0.991, 0.98, 1.0), (8, 0.999, 0.995, 1.0)]}, (1.0, 1.0, 1.0)),  # at the top
    ({"rtn": [(2, 0.0, 0.0, 0.01), (3, 0.004, 0.0, 0.02)]}, None),  # at the bottom
    ({"rtn": [(4, 0.5, None, None)]}, None),  # one point
])  # fmt: skip
def test_accuracy_ticks_are_round_and_within_unit_interval(series, fp):
    fig = P._figure_accuracy_vs_bits(series, fp=fp, title="t", ylabel="accuracy")
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    assert 0 <= lo < hi <= 1
    ticks = [t for t in ax.get_yticks() if lo - 1e-9 <= t <= hi + 1e-9]
    assert len(ticks) >= 3 and all(decimals(t) <= 2 for t in ticks), ticks
    shown = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert shown and all(len(s.split(".")[1]) <= 2 if "." in s else True for s in shown), shown
    assert [x for x in ax.get_xticks()] == sorted({b for pts in series.values() for b, *_ in pts})
    values = [v for pts in series.values() for p in pts for v in p[1:] if v is not None]
    assert lo <= min(values) and max(values) <= hi  # every value and interval is on the plot


def test_lower_is_better_starts_at_zero_and_is_not_clamped():
    fig = P._figure_accuracy_vs_bits({"gptq": [(3, 2.41, 2.3, 2.5), (4, 2.33, None, None)]}, fp=(2.3, None, None),
                                     title="nll", ylabel="nll (nats/token)", higher_is_better=False)
    lo, hi = fig.axes[0].get_ylim()
    assert lo == 0 and hi >= 2.5
    fig = P._figure_pareto([dict(points()[0], value=3.2, lo=3.0, hi=3.4)], title="nll", ylabel="nll", higher_is_better=False)
    assert fig.axes[0].get_ylim()[0] == 0


def test_pareto_front_direction():
    pts = [{"size_mb": s, "value": v} for s, v in [(1, 0.5), (2, 0.4), (3, 0.7), (3, 0.6), (4, 0.7)]]
    assert [(p["size_mb"], p["value"]) for p in P.front(pts)] == [(1, 0.5), (3, 0.7)]
    assert [(p["size_mb"], p["value"]) for p in P.front(pts, higher_is_better=False)] == [(1, 0.5), (2, 0.4)]


@pytest.mark.parametrize("pts", [points(), points(fp=False)[:3], points() + [dict(p, size_mb=p["size_mb"] + 1) for p in points()]])
def test_pareto_labels_do_not_overlap(pts):
    fig = P._figure_pareto(pts, title="crowded", ylabel="accuracy")
    ax, renderer = fig.axes[0], fig.canvas.get_renderer()
    anns = [t for t in ax.texts if t.get_text() in {p["label"] for p in pts}]
    boxes = [Text.get_window_extent(a, renderer) for a in anns]
    for (a, ba), (b, bb) in itertools.combinations(zip(anns, boxes), 2):
        assert not ba.overlaps(bb), (a.get_text(), b.get_text())
    inside = ax.get_window_extent(renderer)
    assert all(inside.x0 <= b.x0 and b.x1 <= inside.x1 and inside.y0 <= b.y0 and b.y1 <= inside.y1 for b in boxes)
    on_front = {p["label"] for p in P.front(pts)}
    assert on_front <= {a.get_text() for a in anns}  # the front, at least, is labelled
    if len(pts) <= 3:
        assert len(anns) == len(pts)


def test_accuracy_ylim_never_below_zero_for_pareto():
    lo, hi = P._figure_pareto(points(), title="t", ylabel="acc").axes[0].get_ylim()
    assert 0 <= lo and hi <= 1
    assert P._figure_pareto(points(), title="t", ylabel="acc").axes[0].get_xlim()[0] >= 0


def test_nothing_to_draw_is_none():
    assert P.accuracy_vs_bits({}, fp=(0.5, None, None), title="t", ylabel="y") is None
    assert P.accuracy_vs_bits({"gptq": [], "rtn": [(4, float("nan"), None, None)]}, fp=None, title="t", ylabel="y") is None
    assert P.pareto([], title="t", ylabel="y") is None
    assert P.cost_bars([], title="t", xlabel="s") is None
    assert P.throughput_bars([("W4", None, None)], title="t", xlabel="tok/s") is None


def test_evil_strings_are_escaped_and_not_mathtext():
    svgs = [P.accuracy_vs_bits({EVIL: [(4, 0.5, 0.4, 0.6)]}, fp=None, title=EVIL, ylabel=EVIL),
            P.pareto([dict(points()[0], label=EVIL, method=EVIL)], title=EVIL, ylabel=EVIL),
            P.cost_bars([(EVIL, 1.0)], title=EVIL, xlabel=EVIL),
            P.throughput_bars([(EVIL, 1.0, 0.1)], title=EVIL, xlabel=EVIL)]
    for svg in svgs:
        assert "a&lt;b &amp;" in svg and "<b " not in svg
        found = texts(svg)
        assert found.count(EVIL) >= 3, found  # title, axis label, a legend entry or bar label: verbatim


def test_method_colors_are_fixed_by_sorted_name():
    c = P.colors(["rtn", "awq", "gptq", "awq"])
    assert list(c) == ["awq", "gptq", "rtn"] and c["awq"] == P.PALETTE[0] and c["rtn"] == P.PALETTE[2]
    line_colors = {ln.get_label(): ln.get_color() for ln in
                   P._figure_accuracy_vs_bits(SERIES, fp=None, title="t", ylabel="y").axes[0].lines}  # fmt: skip
    assert line_colors["gptq g64"] == line_colors["gptq g128"] == P.PALETTE[1]
