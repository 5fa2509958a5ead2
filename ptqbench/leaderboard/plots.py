"""The leaderboard page's figures: matplotlib Figures returned as inline ``<svg>`` strings (None when
there is nothing to draw). No XML declaration, DOCTYPE, metadata or external reference; deterministic
(``svg.hashsalt`` fixed and salted with the title so two figures on a page share no ids, no date);
text kept as ``<text>`` with mathtext off, so ``$`` prints as is. pyplot and the global rcParams are
never touched. Colors: tab10 by sorted method name (series "gptq g64" is method "gptq", its variants
differ by marker and line style); full precision is black. ``_figure_*`` return the Figure (tests)."""

from __future__ import annotations

import io
import itertools
import math
import re

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.text import Text
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import Bbox

WIDTH = 7.0  # inches
PALETTE = matplotlib.colormaps["tab10"].colors
MARKERS, STYLES = "osD^v<>p", ("-", "--", "-.", ":")
RC = {"svg.fonttype": "none", "text.usetex": False, "text.parse_math": False, "font.size": 9,
      "font.family": "DejaVu Sans", "axes.spines.top": False, "axes.spines.right": False,
      "axes.grid": True, "axes.axisbelow": True, "grid.alpha": 0.3, "axes.titlesize": 10, "legend.fontsize": 8}  # fmt: skip
NO_METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}
FP_COLOR, FRONT_COLOR = "black", "0.35"


def _svg(fig: Figure | None, title: str) -> str | None:
    if fig is None:
        return None
    buf = io.StringIO()
    with matplotlib.rc_context({**RC, "svg.hashsalt": f"ptqbench/{title}"}):
        fig.savefig(buf, format="svg", metadata=NO_METADATA)
    text = re.sub(r'<g id="[^"]*">', "<g>", buf.getvalue())  # artist names ("axes_1"): never referenced, not unique
    return text[text.index("<svg"):].strip()  # drop the XML declaration and DOCTYPE


def _finite(*vs) -> bool:
    return all(v is not None and math.isfinite(v) for v in vs)


def _ci(v, lo, hi):
    """(below, above) error-bar lengths, or None when the interval is missing."""
    return (max(v - lo, 0.0), max(hi - v, 0.0)) if _finite(lo, hi) else None


def colors(methods) -> dict[str, tuple]:
    """A fixed qualitative color per method, in sorted-name order."""
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(sorted(set(methods)))}


def _locator(nbins: int = 6) -> MaxNLocator:
    return MaxNLocator(nbins=nbins, steps=[1, 2, 5, 10])  # round ticks only: 0.02, 0.05, 0.1, 0.2 ...


def _set_ylim(ax, values: list[float], centers: list[float], higher_is_better: bool) -> None:
    """Round limits around `values` (points and intervals). Accuracy-like data (higher is better, the
    points in [0, 1]) stays within [0, 1]; lower-is-better metrics start at 0; non-negative data never
    goes below 0. A minimum span keeps the ticks round (at most 2 decimals for accuracies)."""
    unit = higher_is_better and 0 <= min(centers) and max(centers) <= 1
    lo, hi = (max(min(values), 0.0), min(max(values), 1.0)) if unit else (min(values), max(values))
    if not higher_is_better and lo >= 0:
        lo = 0.0
    span, mid = max(hi - lo, 0.1 if unit else 0.1 * max(abs(lo), abs(hi)), 1e-9), (lo + hi) / 2
    lo, hi = min(lo, mid - span / 2) - 0.08 * span, max(hi, mid + span / 2) + 0.08 * span
    ticks = _locator().tick_values(lo, hi)
    lo, hi = max([t for t in ticks if t <= lo] or [ticks[0]]), min([t for t in ticks if t >= hi] or [ticks[-1]])
    floor = 0.0 if (min(values) >= 0 or not higher_is_better) else -math.inf
    ax.set_ylim(max(lo, floor), min(hi, 1.0) if unit else hi)
    ax.yaxis.set_major_locator(_locator())
    ax.yaxis.get_major_formatter().set_useOffset(False)


def _legend_outside(fig: Figure, ax, handles=None) -> None:
    if handles is None:
        handles, _ = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles=handles, loc="outside right upper", frameon=False)


def _freeze(fig: Figure):
    """Run the constrained layout once (Agg renderer) and keep it: later placements use its coordinates."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    fig.set_layout_engine("none")
    return canvas.get_renderer()


@matplotlib.rc_context(RC)  # the style is read when the Figure and its Text are made
def _figure_accuracy_vs_bits(series, *, fp, title, ylabel, higher_is_better=True) -> Figure | None:
    series = {k: sorted((b, v, lo, hi) for b, v, lo, hi in pts if _finite(b, v)) for k, pts in series.items()}
    series = {k: pts for k, pts in sorted(series.items()) if pts}
    if not series:
        return None
    fig = Figure(figsize=(WIDTH, 3.8), dpi=72, layout="constrained")
    ax = fig.add_subplot()
    method = {k: k.split()[0] if k.split() else k for k in series}
    palette, variant = colors(method.values()), {}
    bits = sorted({b for pts in series.values() for b, *_ in pts})
    gap = min((b - a for a, b in itertools.pairwise(bits)), default=1)
    dodge = 0.25 * gap / max(len(series) - 1, 1)  # spread the methods' points at one bit width apart
    values, centers = [], []
    for i, (key, pts) in enumerate(series.items()):
        j = variant[method[key]] = variant.get(method[key], -1) + 1
        xs = [b + (i - (len(series) - 1) / 2) * dodge for b, *_ in pts]
        ax.plot(xs, [p[1] for p in pts], color=palette[method[key]], marker=MARKERS[j % len(MARKERS)],
                ls=STYLES[j % len(STYLES)], ms=5, label=key)
        bars = [(x, p[1], _ci(*p[1:])) for x, p in zip(xs, pts) if _ci(*p[1:])]
        if bars:
            ax.errorbar([x for x, *_ in bars], [v for _, v, _ in bars], yerr=list(zip(*(e for *_, e in bars))),
                        fmt="none", ecolor=palette[method[key]], elinewidth=1, capsize=3)
        values += [v for p in pts for v in p[1:] if _finite(v)]
        centers += [p[1] for p in pts]
    if fp is not None and _finite(fp[0]):
        ax.axhline(fp[0], color=FP_COLOR, ls="--", lw=1, label="full precision")
        values.append(fp[0])
        centers.append(fp[0])
        if _ci(*fp):
            ax.axhspan(fp[1], fp[2], color=FP_COLOR, alpha=0.1, lw=0, label="full precision 95% interval")
            values += [fp[1], fp[2]]
    ax.set_xticks(bits, [f"{b:g}" for b in bits])
    ax.set_xlim(bits[0] - 0.5 * gap, bits[-1] + 0.5 * gap)
    ax.grid(False, axis="x")
    _set_ylim(ax, values, centers, higher_is_better)
    ax.set(title=title, xlabel="weight bits", ylabel=ylabel)
    _legend_outside(fig, ax)
    _freeze(fig)
    return fig


def accuracy_vs_bits(series: dict[str, list[tuple[int, float, float | None, float | None]]], *,
                     fp: tuple[float, float | None, float | None] | None, title: str, ylabel: str,
                     higher_is_better: bool = True) -> str | None:
    """One line per series over weight bits, each value with its interval; full precision dashed."""
    return _svg(_figure_accuracy_vs_bits(series, fp=fp, title=title, ylabel=ylabel, higher_is_better=higher_is_better), title)


def front(points: list[dict], higher_is_better: bool = True) -> list[dict]:
    """Points not beaten by a smaller-or-equal one with an at-least-as-good value, by size."""
    sign = 1 if higher_is_better else -1
    out, best = [], -math.inf
    for p in sorted(points, key=lambda p: (p["size_mb"], -sign * p["value"])):
        if sign * p["value"] > best:
            out.append(p)
            best = sign * p["value"]
    return out


# Label offsets (points) around a marker, tried in order: right, left, above, below, diagonals; the
# far rings get a leader line. A label that fits nowhere is dropped (its point stays, in the legend).
_NEAR = [(6, 0), (-6, 0), (0, 7), (0, -7), (5, 5), (-5, 5), (5, -5), (-5, -5)]
_CANDIDATES = [(o, False) for o in _NEAR] + [((k * dx, k * dy), True) for k in (3, 5, 8) for dx, dy in _NEAR]
LEADER = {"arrowstyle": "-", "lw": 0.6, "color": "0.4", "shrinkA": 1, "shrinkB": 4}
LABEL_BOX = {"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.75}


def _place_labels(ax, pts: list[dict], renderer, lines=()) -> list:
    """Annotate each point where its text overlaps no other label or leader, marker, its own interval
    or a segment of `lines`, and stays inside the axes (extents in display space, from the renderer).
    Labels sit on a translucent white box, so crossing another point's error bar stays readable; a
    leader line may cross markers and intervals, never another label's text."""
    to_px = ax.transData.transform

    def box(a, b, pad):  # the rectangle spanned by two data points, padded by `pad` pixels
        (x0, y0), (x1, y1) = to_px([a, b])
        return Bbox.from_extents(min(x0, x1) - pad, min(y0, y1) - pad, max(x0, x1) + pad, max(y0, y1) + pad)

    def mark(p, pad, whisker=True):  # the marker and (for the point's own label) its error bar
        ys = [v for v in (p["lo"], p["value"], p["hi"]) if _finite(v) and (whisker or v == p["value"])]
        return box((p["size_mb"], min(ys)), (p["size_mb"], max(ys)), pad)

    inside, blocked, px = ax.get_window_extent(renderer), [box(*s, 3) for s in lines], renderer.points_to_pixels(1)
    texts, leaders, placed = [], [], []
    for p in pts:
        x, y = to_px((p["size_mb"], p["value"]))
        obstacles = [mark(p, 4), *(mark(q, 6, whisker=False) for q in pts if q is not p), *blocked, *texts]
        for (dx, dy), leader in _CANDIDATES:
            ann = ax.annotate(p["label"], (p["size_mb"], p["value"]), xytext=(dx, dy), textcoords="offset points",
                              ha="left" if dx > 0 else "right" if dx < 0 else "center",
                              va="bottom" if dy > 0 else "top" if dy < 0 else "center", fontsize=7.5, bbox=LABEL_BOX,
                              arrowprops=LEADER if leader else None)
            ann.set_in_layout(False)
            ann.get_window_extent(renderer)  # positions the text
            text = Text.get_window_extent(ann, renderer).padded(1.5)
            line = [(x + dx * px * t / 16, y + dy * px * t / 16) for t in range(17)] if leader else []
            if (inside.x0 <= text.x0 and text.x1 <= inside.x1 and inside.y0 <= text.y0 and text.y1 <= inside.y1
                    and not any(text.overlaps(b) for b in obstacles)
                    and not any(text.contains(*q) for ln in leaders for q in ln)
                    and not any(t.contains(*q) for t in texts for q in line)):
                texts.append(text)
                leaders.append(line)
                placed.append(ann)
                break
            ann.remove()
    return placed


@matplotlib.rc_context(RC)  # the style is read when the Figure and its Text are made
def _figure_pareto(points, *, title, ylabel, higher_is_better=True) -> Figure | None:
    pts = [p for p in points if _finite(p.get("size_mb"), p.get("value"))]
    if not pts:
        return None
    pts = [{**p, "lo": p.get("lo"), "hi": p.get("hi"), "label": str(p.get("label", ""))} for p in pts]
    fig = Figure(figsize=(WIDTH, 4.4), dpi=72, layout="constrained")
    ax = fig.add_subplot()
    palette = colors(p.get("method", "") for p in pts if not p.get("fp"))
    best = front(pts, higher_is_better)
    ax.step([p["size_mb"] for p in best], [p["value"] for p in best], where="post", color=FRONT_COLOR, lw=1.2, zorder=1)
    handles = {}
    for p in pts:
        c = FP_COLOR if p.get("fp") else palette[p.get("method", "")]
        err = _ci(p["value"], p["lo"], p["hi"])
        ax.errorbar([p["size_mb"]], [p["value"]], yerr=[[e] for e in err] if err else None, fmt="*" if p.get("fp") else "o",
                    color=c, ms=9 if p.get("fp") else 6, mec="white", mew=0.6, elinewidth=1, capsize=3, zorder=3)
        name = "full precision" if p.get("fp") else p.get("method", "")
        handles.setdefault(name, Line2D([], [], color=c, marker="*" if p.get("fp") else "o", ls="none", label=name))
    handles = [handles[k] for k in sorted(handles, key=lambda k: (k == "full precision", k))]
    handles.append(Line2D([], [], color=FRONT_COLOR, lw=1.2, label="Pareto front"))
    vals = [v for p in pts for v in (p["value"], p["lo"], p["hi"]) if _finite(v)]
    _set_ylim(ax, vals, [p["value"] for p in pts], higher_is_better)
    ax.xaxis.set_major_locator(_locator())
    ax.margins(x=0.12)
    ax.set_xlim(left=max(0.0, ax.get_xlim()[0]))
    ax.set(title=title, xlabel="model size (MB)", ylabel=ylabel)
    _legend_outside(fig, ax, handles)
    renderer = _freeze(fig)
    # front first, then full precision, then the rest: what gets dropped when crowded is the least useful
    on_front = {id(p) for p in best}
    steps = [((a["size_mb"], a["value"]), (b["size_mb"], a["value"])) for a, b in itertools.pairwise(best)]
    steps += [((b["size_mb"], a["value"]), (b["size_mb"], b["value"])) for a, b in itertools.pairwise(best)]
    _place_labels(ax, sorted(pts, key=lambda p: (id(p) not in on_front, not p.get("fp"))), renderer, steps)
    return fig


def pareto(points: list[dict], *, title: str, ylabel: str, higher_is_better: bool = True) -> str | None:
    """Value against model size, with intervals, the Pareto front as a step line and point labels."""
    return _svg(_figure_pareto(points, title=title, ylabel=ylabel, higher_is_better=higher_is_better), title)


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


@matplotlib.rc_context(RC)  # the style is read when the Figure and its Text are made
def _figure_bars(rows, *, title, xlabel, color) -> Figure | None:
    rows = [(str(label), v, s if _finite(s) else None) for label, v, s in rows if _finite(v)]
    if not rows:
        return None
    fig = Figure(figsize=(WIDTH, 1.3 + 0.3 * len(rows)), dpi=72, layout="constrained")
    ax = fig.add_subplot()
    ys = range(len(rows))
    half = [s / 2 if s else 0.0 for *_, s in rows]  # the spread (an IQR) drawn as its width around the value
    ax.barh(ys, [v for _, v, _ in rows], height=0.6, color=color,
            xerr=half if any(half) else None, error_kw={"ecolor": "0.2", "elinewidth": 1, "capsize": 3})
    for y, (_, v, _), h in zip(ys, rows, half):
        ax.annotate(_fmt(v), (v + h, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_yticks(list(ys), [label for label, *_ in rows])
    ax.set_ylim(len(rows) - 0.4, -0.6)  # first row on top, as given
    top = max(max(v + h, 0) for (_, v, _), h in zip(rows, half))
    ax.set_xlim(min(0.0, min(v for _, v, _ in rows)), top * 1.15 or 1.0)
    ax.xaxis.set_major_locator(_locator())
    ax.grid(False, axis="y")
    ax.set(title=title, xlabel=xlabel)
    _freeze(fig)
    return fig


def cost_bars(rows: list[tuple[str, float]], *, title: str, xlabel: str) -> str | None:
    """Horizontal bars (label, seconds), in the order given."""
    return _svg(_figure_bars([(label, v, None) for label, v in rows], title=title, xlabel=xlabel, color=PALETTE[0]), title)


def throughput_bars(rows: list[tuple[str, float, float | None]], *, title: str, xlabel: str) -> str | None:
    """Horizontal bars (label, tokens/s, spread), in the order given; the spread (an IQR) is drawn as
    an error bar that wide, centred on the value."""
    return _svg(_figure_bars(rows, title=title, xlabel=xlabel, color=PALETTE[2]), title)
