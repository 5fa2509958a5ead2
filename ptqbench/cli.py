"""`bench` / `ptqbench` command line (typer + rich)."""

from __future__ import annotations

import inspect
import os
import sys
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights and data come from disk, never the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lmms-eval datasets too: a missing one fails its task, nothing is fetched

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ptqbench.errors import BadInput

app = typer.Typer(add_completion=False, no_args_is_help=False, pretty_exceptions_enable=False, help="Compare post-training quantization methods for VLMs.")
console = Console()
err_console = Console(stderr=True)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


class _PlainProgress:
    """Stands in for rich's Progress when stdout is a log file (CI, nohup, a cluster job): no bars, which
    rich would only write at the end; the runner's per-cell lines are the progress."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *a, **k):
        return 0

    def advance(self, *a, **k):
        pass

    def update(self, *a, **k):
        pass

    def remove_task(self, *a, **k):
        pass


def _log_line(message: str) -> None:
    """One plain line, flushed at once (a log file sees it when it happens)."""
    print(message, flush=True)


def _run_parameters() -> list[inspect.Parameter]:
    """`bench run`'s flags, one per declared setting (config.py), then --option and --config."""
    from ptqbench.config import SETTINGS, list_item_type

    params = []
    for s in SETTINGS.values():
        if not s.cli:
            continue
        scalar = next((a for a in getattr(s.type, "__args__", (s.type,)) if a is not type(None)), s.type)
        annotation = Optional[str] if list_item_type(s) is not None else Optional[scalar]
        decls = s.flags or (f"--{s.flag}",)
        params.append(inspect.Parameter(s.key, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                        default=typer.Option(None, *decls, help=s.help, rich_help_panel=s.section)))
    params.append(inspect.Parameter("option", inspect.Parameter.KEYWORD_ONLY, annotation=list[str],
                                    default=typer.Option([], "--option", "-o", help="method option METHOD.KEY=VALUE (repeatable)")))
    params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                                    default=typer.Option(None, "--config", help="YAML file with the same keys as these flags")))
    return params


def _config(given: dict):
    """The run's config from `bench run`'s flags (and --config)."""
    from ptqbench.config import SETTINGS, list_item_type, load_config, parse_list, parse_option

    config, option = given.pop("config"), given.pop("option")
    overrides = {}
    for key, value in given.items():
        item = list_item_type(SETTINGS[key])
        overrides[key] = parse_list(value, item, key) if item is not None and value is not None else value
    if option:
        opts: dict = {}
        for text in option:
            m, k, v = parse_option(text)
            opts.setdefault(m, {})[k] = v
        overrides["options"] = opts
    return load_config(config, overrides)


def run(**given):
    """Quantize a model with every method x bits, evaluate, and store the results."""
    cfg = _config(given)

    from ptqbench.grid.runner import run_grid

    if console.is_terminal:
        with _progress() as progress:
            summary = run_grid(cfg, progress=progress, log=lambda m: progress.console.print(m, markup=False, highlight=False))
    else:
        summary = run_grid(cfg, progress=_PlainProgress(), log=_log_line)
    _print_summary(summary)
    failed = [c for c in summary.cells if c.status == "failed"]
    if failed:
        err_console.print(f"[red]{len(failed)} cell(s) failed[/red]:", soft_wrap=True)
        for c in failed:
            err_console.print(f"  {c.method} {c.fmt}: {c.error}", soft_wrap=True, markup=False)
        raise typer.Exit(1)


run.__signature__ = inspect.Signature(_run_parameters())
app.command()(run)


def perf(**given):
    """Time the grid's quantization in both schedules (cells, lockstep) side by side; check identical results."""
    import json

    repeats, out = given.pop("repeats"), given.pop("json")
    if repeats < 1:
        err_console.print(f"repeats {repeats!r} is not accepted; accepted: a positive integer", markup=False)
        raise typer.Exit(2)
    cfg = _config(given)
    from ptqbench.grid.perf import perf as run_perf, report_lines

    res = run_perf(cfg, repeats, log=_log_line)
    for line in report_lines(res):
        _log_line(line)
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=2)
    if not res["identical"]:
        raise typer.Exit(1)


perf.__signature__ = inspect.Signature(_run_parameters() + [
    inspect.Parameter("repeats", inspect.Parameter.KEYWORD_ONLY, annotation=int,
                      default=typer.Option(2, "--repeats", help="interleaved rounds per schedule")),
    inspect.Parameter("json", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                      default=typer.Option(None, "--json", help="also write the figures to this JSON file"))])
app.command()(perf)


def _print_summary(summary) -> None:
    metrics: list[str] = []
    for c in summary.cells:
        for k in c.metrics:
            if k not in metrics:
                metrics.append(k)
    # Headline metrics first (task metrics, then reconstruction), per-family/per-token breakdowns after.
    metrics.sort(key=lambda m: ("/" in m.split("/", 1)[1], m.startswith("recon/"), m))
    # a terminal gets what fits its width; a log file gets every metric on wide lines, never cut
    shown = metrics[: max(2, (console.width - 30) // 11)] if console.is_terminal else metrics
    width = 30 + sum(max(10, len(m)) + 3 for m in shown)
    out = console if console.is_terminal else Console(width=max(120, width), force_terminal=False)
    table = Table(title=f"{summary.model}  (group size {summary.group_size}, calibration {summary.calib_manifest['content_hash']})")
    table.add_column("method")
    table.add_column("bits", justify="right")
    table.add_column("status")
    for m in shown:
        label = m.removeprefix("recon/").replace("/", " ")
        table.add_column(label, justify="right", min_width=None if console.is_terminal else len(label))
    for c in summary.cells:
        vals = [("—" if c.metrics.get(m) is None else f"{c.metrics[m]:.4g}") for m in shown]
        status = {"failed": "[red]failed[/red]", "cached": "cached", "busy": "other run"}.get(c.status, f"{c.seconds:.1f}s")
        bits = str(c.bits) if c.act_bits >= 16 else f"{c.bits} a{c.act_bits}" + ("t" if c.act_scheme == "tensor" else "")  # W4A8: "4 a8"; static: "4 a8t"
        table.add_row(c.method, bits, status, *vals)
    out.print(table)
    if len(shown) < len(metrics):
        out.print(f"{len(metrics) - len(shown)} more metrics in the store: bench leaderboard --runs {summary.run_dir.parent}")
    out.print(f"results: {summary.run_dir.parent / 'results.sqlite'}  run folder: {summary.run_dir}", soft_wrap=True)


@app.command("methods")
def methods_cmd():
    """List registered methods (built-in and plugins) with their options."""
    from ptqbench.methods.base import option_rows
    from ptqbench.methods.registry import all_methods, plugin_errors

    table = Table(title="ptqbench methods")
    for col in ("method", "origin", "streams", "summary", "options (default)"):
        table.add_column(col)
    for name, (cls, origin) in sorted(all_methods().items()):
        opts = "\n".join(f"{n}={d!r}: {h}" for n, d, h in option_rows(cls.Options)) or "—"
        table.add_row(name, origin, cls.streams, cls.summary, opts)
    console.print(table)
    for name, err in plugin_errors().items():
        err_console.print(f"[red]plugin {name!r} failed to load[/red]: {err}")


@app.command()
def leaderboard(
    runs: str = typer.Option("runs", help="runs folder holding results.sqlite"),
    format: str = typer.Option("md", "--format", help="md, html, latex (booktabs), csv (one row per stored value) or json"),
    out: Optional[str] = typer.Option(None, help="write to this file instead of stdout"),
):
    """Render the results store as markdown, a self-contained HTML page, LaTeX tables, CSV or JSON."""
    from ptqbench.leaderboard import leaderboard as render_leaderboard

    text = render_leaderboard(runs, format, out)
    if out is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    else:
        console.print(f"wrote {out}")


@app.command()
def export(
    cell: str = typer.Argument(..., help="cell id (or unique prefix) from the store, a cell directory, or its model.safetensors"),
    out: str = typer.Argument(..., help="output directory (new or empty)"),
    runs: str = typer.Option("runs", help="runs folder holding results.sqlite (to resolve a cell id)"),
    model: Optional[str] = typer.Option(None, help="base model for config/processor (default: the cell's)"),
    format: Optional[str] = typer.Option(None, "--format", help="gptq (v1, zeros minus one), gptq_v2 or compressed-tensors "
                                         "(vLLM / llm-compressor); default: compressed-tensors for a weight-activation "
                                         "cell (W4A8, W8A8), gptq otherwise"),
    shift_zero: bool = typer.Option(True, "--shift-zero/--no-shift-zero", help="rewrite zero 0 as zero 1, codes+1 (lossless) for gptq v1"),
    overwrite: bool = typer.Option(False, help="replace a non-empty OUT"),
):
    """Export a quantized cell as a GPTQ or a compressed-tensors checkpoint."""
    from ptqbench.deploy.export_ct import export_cell
    from ptqbench.grid.resolve import resolve_cell

    s = export_cell(resolve_cell(cell, runs), out, model, export_format=format, shift_zero=shift_zero, overwrite=overwrite)
    fmt = f"{s.export_format} {s.layout}".strip()
    w = f"w{s.bits}" + (f"a{s.act_bits}" if s.act_bits < 16 else "")
    shifted = f", {s.shifted_groups} zero points shifted" if s.export_format == "gptq" else ""
    console.print(f"wrote {s.out_dir} ({fmt}): {s.method} {w} g{s.group_size} desc_act={s.desc_act} sym={s.sym}, "
                  f"{s.n_quantized} layers, {s.nbytes / 2**20:.1f} MiB{shifted}")


def main() -> None:
    try:
        app()
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)  # one plain line, never wrapped
        sys.exit(2)


if __name__ == "__main__":
    main()
