"""The grid runner: one calibration set, every (method, bits) cell, results into the store.

A cell is the quantized model, keyed by everything that produced it; its task scores and deployment
figures are units keyed by their own settings too (leaderboard/store.py). A rerun computes exactly what
is missing: a cell whose quantization is stored but lacks a task is evaluated on its saved packed
weights, never re-quantized. Failures stay where they happen: an exception or a non-finite number in a
cell's quantization, one of its tasks or its latency is recorded against that piece, the rest is kept,
and the grid goes on. Cells are claimed in the store, so concurrent runs never compute one twice.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ptqbench.config import RunConfig
from ptqbench.errors import BadInput
from ptqbench.models.adapters import adapter_for
from ptqbench.engine.calibration import build_calibration
from ptqbench.engine.blockwise import EngineResult, quantize_model
from ptqbench.deploy.measure import measure
from ptqbench.models.sources import load_model, resolve_device, resolve_dtype
from ptqbench.grid.preflight import make_run_dir, validate_inputs, write_atomic
from ptqbench.methods import QuantSpec, get_method

FP_METHOD = "fp"
FORMAT_METHOD = "format"  # a deployment format's own cell: its latency, measured once per model (run_formats)
CELL_FILE = "model.safetensors"
EVAL_BATCH = 16  # items per evaluation batch (part of a task unit's identity: padding can move a logit)
LATENCY_PROTOCOL = 1  # bump when latency.measure_inference's protocol (prompt, warm-up, repeats) changes


@dataclass
class CellOutcome:
    method: str
    bits: int
    status: str  # done | failed | cached | busy (claimed by another live run)
    metrics: dict = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


@dataclass
class RunSummary:
    run_dir: Path
    model: str
    group_size: int
    calib_manifest: dict
    cells: list[CellOutcome]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def place_outside_decoder(model: torch.nn.Module, decoder_path: str, device: torch.device) -> None:
    """Move every parameter and buffer except the decoder layers' to `device`. Capture only needs the
    embeddings and the vision tower, so a model whose decoder does not fit the GPU still captures there."""
    for name, mod in model.named_modules():
        if name == decoder_path or name.startswith(decoder_path + "."):
            continue
        for pname, p in mod.named_parameters(recurse=False):
            p.data = p.data.to(device)
        for bname, buf in mod.named_buffers(recurse=False):
            mod._buffers[bname] = buf.to(device)


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of distinct tensors (tied weights such as embed/lm_head counted once)."""
    seen, total = set(), 0
    for t in state.values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def recon_metrics(result: EngineResult) -> dict[str, float]:
    """Layer reconstruction errors, the figures a run reports when no task is asked for."""
    out: dict[str, float] = {}
    lin = result.diagnostics["linears"].values()
    for t in ("all", "vision", "text", "answer"):
        vals = [e[t] for e in lin if e.get(t) is not None]
        if vals:
            out["linear_rel_err" + ("" if t == "all" else f"/{t}")] = sum(vals) / len(vals)
    last = result.diagnostics["blocks"][max(result.diagnostics["blocks"])]["stream"]
    for t in ("all", "vision", "text", "answer"):
        if last.get(t) is not None:
            out["final_rel_err" + ("" if t == "all" else f"/{t}")] = last[t]
    return out


@dataclass
class Unit:
    """A task evaluation or a deployment measurement of one cell, keyed by its own settings."""

    kind: str  # eval | deploy
    name: str  # the task's name, or "deploy"
    key: dict
    unit_id: str


@dataclass
class Cell:
    method: str
    bits: int
    key: dict  # the store's cell key and identity fields
    cell_id: str
    units: list[Unit] = field(default_factory=list)
    quantize: bool = True  # False: the quantization is stored, only units are missing


@dataclass
class Grid:
    """Everything a cell needs, prepared (and validated) once: model, calibration, methods, tasks."""

    cfg: RunConfig
    lm: object  # LoadedModel
    calib: object  # CalibSet
    instances: dict  # (method, bits) -> Method
    tasks: dict
    group_size: int
    device: torch.device
    dtype: torch.dtype
    run_dir: Path
    env: dict

    @property
    def manifest(self) -> dict:
        return self.calib.manifest


def prepare(cfg: RunConfig, progress=None, log=print, new_run_dir: bool = True) -> Grid:
    """Validate the whole grid before any expensive work, load the model, capture (or load) calibration.
    Nothing is written before every input has been checked."""
    from ptqbench.grid.store import current_environment

    seed_everything(cfg.seed)
    if new_run_dir:
        methods, device = validate_inputs(cfg)
    else:  # a worker of a grid its driver has validated: the store, runs folder and sources are the driver's
        methods, device = {m: get_method(m) for m in cfg.method_list()}, resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    lm = load_model(cfg.model, dtype, allow_pickle=cfg.allow_pickle)
    lm.adapter.image_token_id()  # a model without an image token is refused here
    if lm.lazy:  # random-weight cost runs: nothing to score, no deployment, no whole-model passes
        whole = [m for m, cls in methods.items() if cls.needs_whole_model]
        if whole:
            raise BadInput(f"method {whole[0]!r} needs the whole model before quantizing (gradient pass), which a lazily built "
                           f"{cfg.model!r} does not hold; accepted: " + ", ".join(m for m, c in methods.items() if not c.needs_whole_model))
        if cfg.tasks:
            raise BadInput(f"tasks {','.join(cfg.tasks)!r} cannot score random weights ({cfg.model!r}); accepted: no tasks")
        if cfg.latency:
            raise BadInput(f"latency cannot be measured on a lazily built {cfg.model!r} (its blocks are not in memory); accepted: --no-latency")
        if cfg.save_model:
            raise BadInput(f"saving the quantized random-weight {cfg.model!r} is refused (its size is the checkpoint's); accepted: --no-save-model")
    group_size = cfg.group_size if cfg.group_size is not None else lm.group_size
    specs = {b: QuantSpec(bits=b, group_size=group_size, sym=cfg.sym, grid=cfg.grid) for b in cfg.bits}
    widths = {m.in_features for blk in lm.adapter.decoder_layers() for m in lm.adapter.block_linears(blk).values()}
    instances = {(m, b): cls(specs[b], **cfg.options.get(m, {})) for m, cls in methods.items() for b in cfg.bits}
    if cfg.quantize_vision:
        for m, cls in methods.items():
            if not cls.supports_vision:
                raise BadInput(f"method {m!r} cannot quantize the vision tower (it needs the decoder's block structure); accepted with --quantize-vision: "
                               + ", ".join(n for n, c in methods.items() if c.supports_vision))
        if lm.adapter.vision_blocks() is None:
            raise BadInput(f"model {cfg.model!r} has no known vision tower; accepted: quantize-vision false")
        for blk in lm.adapter.vision_blocks():
            widths |= {m.in_features for m in lm.adapter.block_linears(blk).values()}
    for w in sorted(widths):
        specs[cfg.bits[0]].groups_for(w)
    from ptqbench.eval.tasks import get_task

    task_names = cfg.tasks if cfg.tasks is not None else lm.tasks
    tasks = {t: get_task(t) for t in task_names}
    env = current_environment()
    env["device"] = str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)

    runs = Path(cfg.runs)
    place_outside_decoder(lm.model, lm.adapter.decoder_path, device)  # embeddings + vision tower for capture
    calib = build_calibration(lm.model, lm.adapter, lm.processor, cfg.calib, cfg.calib_n, cfg.seq_len, cfg.seed,
                              batch_size=cfg.batch_size, image_root=cfg.image_root, cache_dir=runs / ".calib",
                              progress=progress, vision=cfg.quantize_vision, warn=log)
    place_outside_decoder(lm.model, lm.adapter.decoder_path, torch.device("cpu"))
    if new_run_dir:  # the first write of the run: every input has been checked by now
        run_dir = make_run_dir(runs, cfg.name)
        write_atomic(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=True))
        write_atomic(run_dir / "calibration.json", json.dumps(calib.manifest, indent=2))
        m = calib.manifest
        t = m["tokens"]
        share = t["vision"] / max(1, t["valid"])
        log(f"calibration {m['content_hash']}: {m['n_samples']} samples, {t['valid']} tokens: vision {t['vision']} "
            f"({share:.0%}), text {t['text']} ({1 - share:.0%}, of which answer {t['answer']})"
            + (f"; {m['background_patch_share']:.0%} of image patches are pure background"
               if m.get("background_patch_share") is not None else ""))
    else:
        run_dir = runs / (cfg.name or "worker")
    return Grid(cfg, lm, calib, instances, tasks, group_size, device, dtype, run_dir, env)


# ---- the plan: cells and their units ----------------------------------------------------------------
def _units(grid: Grid) -> list[Unit]:
    from ptqbench.grid.store import ResultsStore

    cfg, units = grid.cfg, []
    for name, task in grid.tasks.items():
        key = dict(kind="eval", **task.identity(cfg.eval_n), batch_size=EVAL_BATCH)
        units.append(Unit("eval", name, key, ResultsStore.unit_id(key)))
    return units


def _identity(grid: Grid) -> dict:
    return dict(model=grid.cfg.model, model_fingerprint=grid.manifest.get("model"), dtype=str(grid.dtype).removeprefix("torch."),
                device_type=grid.device.type)


def _fp_key(grid: Grid) -> dict:
    return dict(_identity(grid), method=FP_METHOD, method_options={}, bits=16, group_size=0, sym=False, calib_hash="-")


def plan(grid: Grid) -> list[Cell]:
    """Full precision first (when there is a task to score), then every (method, bits)."""
    from ptqbench.grid.store import ResultsStore

    cfg = grid.cfg
    identity = _identity(grid)
    units = _units(grid)
    cells = []
    if units:  # full precision: the accuracy baseline
        key = _fp_key(grid)
        cells.append(Cell(FP_METHOD, 16, key, ResultsStore.cell_id(**key), list(units), quantize=False))
    for (method, bits), inst in grid.instances.items():
        options = inst.options_dict()
        if cfg.quantize_vision:
            options["quantize_vision"] = True  # part of the cell's identity
        if cfg.max_blocks is not None:
            options["max_blocks"] = cfg.max_blocks  # a partial (cost) cell is never mistaken for a whole one
        key = dict(identity, method=method, method_options=options, bits=bits, group_size=grid.group_size, sym=cfg.sym,
                   grid=cfg.grid, seed=cfg.seed, calib_hash=grid.manifest["content_hash"])
        cells.append(Cell(method, bits, key, ResultsStore.cell_id(**key), list(units)))
    return cells


def plan_formats(grid: Grid) -> list[Cell]:
    """The deployment formats of the grid, full precision first: latency belongs to a format (bits, group
    size, sym, kernel, dtype, batch), not to a method, so each is timed once per model, on the model
    quantized to that format with RTN (a kernel's speed does not depend on the values it multiplies), and
    the leaderboard shows it on every method's row of that format."""
    from ptqbench.grid.store import ResultsStore

    cfg = grid.cfg
    if not cfg.latency:
        return []
    key = dict(kind="deploy", kernel=cfg.kernel, infer_dtype=cfg.infer_dtype, batch=cfg.latency_batch,
               new_tokens=cfg.latency_tokens, device_type=grid.device.type, protocol=LATENCY_PROTOCOL)
    unit = Unit("deploy", "deploy", key, ResultsStore.unit_id(key))
    fp = _fp_key(grid)
    cells = [Cell(FP_METHOD, 16, fp, ResultsStore.cell_id(**fp), [unit], quantize=False)]
    for bits in cfg.bits:
        options = {"quantize_vision": True} if cfg.quantize_vision else {}
        fkey = dict(_identity(grid), method=FORMAT_METHOD, method_options=options, bits=bits, group_size=grid.group_size,
                    sym=cfg.sym, grid=cfg.grid, calib_hash="-")
        cells.append(Cell(FORMAT_METHOD, bits, fkey, ResultsStore.cell_id(**fkey), [unit], quantize=False))
    return cells


def _format_model(grid: Grid, cell: Cell):
    """The base model deployed in the cell's format: RTN weights packed for the kernel (or dense for FP)."""
    from ptqbench.deploy.kernels import deploy
    from ptqbench.methods.quant import quantize_rtn

    cfg = grid.cfg
    model = copy.deepcopy(grid.lm.model)
    quantized = {}
    if cell.method == FORMAT_METHOD:
        adapter = adapter_for(model)
        spec = QuantSpec(bits=cell.bits, group_size=grid.group_size, sym=cfg.sym, grid=cfg.grid)
        stacks = [(adapter.decoder_path, adapter.decoder_layers())]
        if cfg.quantize_vision:
            stacks.append((adapter.vision_blocks_path, adapter.vision_blocks()))
        for prefix, blocks in stacks:
            for i, blk in enumerate(blocks):
                for n, lin in adapter.block_linears(blk).items():
                    quantized[f"{prefix}.{i}.{n}"] = qw = quantize_rtn(lin.weight.data.float(), spec)
                    lin.weight.data = qw.dequantize().to(lin.weight.dtype)
    dtype = getattr(torch, cfg.infer_dtype)
    model.to(dtype).to(grid.device)
    if quantized:
        deploy(model, quantized, cfg.kernel, dtype=dtype)
    return model.eval()


def run_formats(grid: Grid, store, owner: str, log) -> list[CellOutcome]:
    """Time every format whose latency the store lacks, all in one interleaved measurement."""
    from ptqbench.deploy.latency import measure_interleaved

    cfg, outcomes, todo = grid.cfg, [], []
    for cell in plan_formats(grid):
        label = "FP" if cell.method == FP_METHOD else f"W{cell.bits} g{grid.group_size}"
        if not cfg.force and cell.units[0].unit_id in store.done_units(cell.cell_id):
            continue
        busy = store.claim(cell.cell_id, dict(cell.key, run_id=grid.run_dir.name, env=grid.env, config=cfg.to_dict(),
                                              device=grid.env["device"]), owner)
        if busy:
            log(f"[BUSY] latency {label}: being measured by {busy}; left to it")
            continue
        todo.append((label, cell))
    if not todo:
        return outcomes
    t0 = time.perf_counter()
    log(f"[latency] timing {len(todo)} format(s) in interleaved rounds: {', '.join(label for label, _ in todo)}")
    models, results = {}, {}
    for label, cell in todo:
        try:
            models[label] = _format_model(grid, cell)
        except Exception as e:  # noqa: BLE001 - that format fails, the others are timed
            results[label] = e
    results.update(measure_interleaved(models, grid.lm.processor, device=grid.device, new_tokens=cfg.latency_tokens,
                                       batch_size=cfg.latency_batch))
    models.clear()
    for label, cell in todo:
        r, unit = results[label], cell.units[0]
        try:
            if isinstance(r, BaseException):
                store.record_unit(cell.cell_id, unit.unit_id, "deploy", unit.key, [], error=_one_line(r))
                outcomes.append(CellOutcome(f"latency {label}", cell.bits, "failed", error=_one_line(r)))
                log(f"[FAILED] latency {label}: {_one_line(r)}")
                continue
            bad = _nonfinite({k: r[k] for k in ("prefill_ms", "decode_tok_s")})
            if bad:
                raise FloatingPointError(f"latency {label}: {bad}")
            fields = {k: r[k] for k in ("model_bytes", "prefill_ms", "prefill_ms_spread", "decode_tok_s", "decode_tok_s_spread",
                                        "infer_peak_bytes", "kernel")}
            rows = [dict(task="deploy", metric="decode_tok_s", value=r["decode_tok_s"], n=r["repeats"], **fields),
                    dict(task="deploy", metric="prefill_ms_cv", value=r["prefill_ms_cv"], n=r["repeats"]),
                    dict(task="deploy", metric="decode_tok_s_cv", value=r["decode_tok_s_cv"], n=r["repeats"])]
            store.record_unit(cell.cell_id, unit.unit_id, "deploy", unit.key, rows)
            outcomes.append(CellOutcome(f"latency {label}", cell.bits, "done",
                                        {"deploy/decode_tok_s": r["decode_tok_s"], "deploy/prefill_ms": r["prefill_ms"]}))
        except (BadInput, FloatingPointError) as e:
            store.record_unit(cell.cell_id, unit.unit_id, "deploy", unit.key, [], error=str(e))
            outcomes.append(CellOutcome(f"latency {label}", cell.bits, "failed", error=str(e)))
            log(f"[FAILED] latency {label}: {e}")
        finally:
            store.release(cell.cell_id, owner)
    done = [o for o in outcomes if o.status == "done"]
    log(f"[latency] {len(done)}/{len(todo)} format(s) timed in {_fmt_s(time.perf_counter() - t0)}")
    return outcomes


# ---- one cell: quantize (or reload), then each missing unit -----------------------------------------
def _nonfinite(values: dict) -> str | None:
    bad = [k for k, v in values.items() if not (isinstance(v, (int, float)) and math.isfinite(v))]
    return f"non-finite value(s) {', '.join(f'{k}={values[k]!r}' for k in bad[:3])}" if bad else None


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def score_interval(score) -> dict:
    """The 95% interval stored with a task score: Wilson for a proportion, a bootstrap over items for a mean."""
    from ptqbench.leaderboard.stats import bootstrap_mean, wilson

    if not score.items:
        return dict(ci_low=None, ci_high=None)
    if score.kind == "proportion":
        lo, hi = wilson(int(round(sum(score.items))), len(score.items))
    else:
        lo, hi = bootstrap_mean(score.items, score.weights)
    ok = math.isfinite(lo) and math.isfinite(hi)
    return dict(ci_low=lo if ok else None, ci_high=hi if ok else None)


def cell_file(grid: Grid, cell: Cell) -> Path:
    return grid.run_dir / "cells" / cell.cell_id / CELL_FILE


def _quantize(grid: Grid, cell: Cell, model, progress) -> tuple[dict, list[dict], dict]:
    """Quantize `model` in place with the cell's method: (quantized weights, rows, artifacts)."""
    from ptqbench.deploy.packing import pack, packed_nbytes, save_quantized

    cfg, device = grid.cfg, grid.device
    inst = grid.instances[(cell.method, cell.bits)]
    with measure(device) as cost:
        result = quantize_model(model, adapter_for(model), grid.calib, inst, device=device, progress=progress,
                                include_vision=cfg.quantize_vision, max_blocks=cfg.max_blocks)
    for name, qw in result.quantized.items():  # a NaN weight fails this cell, not the grid
        if not (torch.isfinite(qw.scale).all() and torch.isfinite(qw.zero).all()):
            raise FloatingPointError(f"non-finite scale or zero in {name}")
    packed = {n: pack(qw) for n, qw in result.quantized.items()}
    other = {n: p for n, p in model.state_dict().items() if n.removesuffix(".weight") not in result.quantized}
    model_bytes = sum(packed_nbytes(t) for t in packed.values()) + state_bytes(other)
    recon = recon_metrics(result)
    bad = _nonfinite(recon)
    if bad:
        raise FloatingPointError(f"reconstruction error: {bad}")
    extra = dict(calib_seconds=cost.seconds, calib_peak_bytes=cost.peak_bytes, model_bytes=model_bytes)
    rows = [dict(task="recon", metric=m, value=v, **extra) for m, v in recon.items()]
    artifacts = dict(diagnostics=result.diagnostics, method_info=result.method_info, memory_kind=cost.kind)
    if cfg.save_model:
        out = cell_file(grid, cell)
        out.parent.mkdir(parents=True, exist_ok=True)
        # fp32 scales: a later task evaluated on the reloaded weights sees exactly these weights
        save_quantized(out, result.quantized, other,
                       dict(model=cfg.model, method=cell.method, bits=cell.bits, options=cell.key["method_options"],
                            group_size=grid.group_size, sym=cfg.sym, calib_hash=grid.manifest["content_hash"]),
                       scale_dtype=torch.float32)
        artifacts["model_file"] = str(out.relative_to(Path(cfg.runs)))
    return result.quantized, rows, artifacts


def _reload(grid: Grid, model, path: Path) -> dict:
    """Put a cell's saved packed weights into `model` (its fake-quant form, exactly as quantized)."""
    from ptqbench.deploy.packing import load_quantized

    weights, other, _ = load_quantized(path)
    unexpected = model.load_state_dict(other, strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f"saved cell {path} holds parameters the model lacks: {unexpected[:3]}")
    for name, qw in weights.items():
        lin = model.get_submodule(name)
        lin.weight.data = qw.dequantize().to(lin.weight.device, lin.weight.dtype)
    return weights


def run_cell(grid: Grid, cell: Cell, progress=None, stored_file: Path | None = None) -> dict:
    """Quantize the cell (or reload its stored weights), then compute each of its missing units.
    Pure computation, returns plain data: {"quant": {"rows", "artifacts"} | None, "units": [...]}, each unit
    {"unit", "kind", "key", "rows", "error"}. An exception in the quantization propagates (the cell fails);
    one in a unit is that unit's error."""
    cfg, lm, device = grid.cfg, grid.lm, grid.device
    seed_everything(cfg.seed)
    model = copy.deepcopy(lm.model)
    out: dict = {"quant": None, "units": []}
    if cell.method != FP_METHOD:
        if cell.quantize or stored_file is None:
            _, rows, artifacts = _quantize(grid, cell, model, progress)
            out["quant"] = dict(rows=rows, artifacts=artifacts)
        else:
            _reload(grid, model, stored_file)
    if cell.units:
        model.to(device)
    for unit in cell.units:
        t0 = time.perf_counter()
        try:
            if unit.kind == "eval":  # accuracy on the fake-quant weights (the method's exact output)
                task = grid.tasks[unit.name]
                seed_everything(cfg.seed)
                scores = task.scores(model, lm.processor, n=cfg.eval_n, batch_size=EVAL_BATCH, progress=progress)
                bad = _nonfinite({m: sc.value for m, sc in scores.items()})
                if bad:
                    raise FloatingPointError(f"task {unit.name}: {bad}")
                rows = [dict(task=unit.name, metric=m, value=sc.value, n=sc.n, **score_interval(sc)) for m, sc in scores.items()]
                items = {m: dict(kind=sc.kind, items=sc.items, weights=sc.weights) for m, sc in scores.items() if sc.items}
            else:
                raise ValueError(f"unit kind {unit.kind!r} is not run per cell")  # deployment: run_formats
            out["units"].append(dict(unit=unit.unit_id, kind=unit.kind, key=unit.key, rows=rows, error=None, items=items,
                                     seconds=time.perf_counter() - t0))
        except Exception as e:  # this unit failed; the cell's other results stand
            import traceback

            out["units"].append(dict(unit=unit.unit_id, kind=unit.kind, key=unit.key, rows=[],
                                     error=_one_line(e) + "\n" + traceback.format_exc(limit=6), seconds=time.perf_counter() - t0))
    del model
    return out


# ---- the grid ------------------------------------------------------------------------------------
def _missing(store, cell: Cell, force: bool) -> Cell | None:
    """The cell reduced to what the store lacks (None: nothing). `force` recomputes everything."""
    if force:
        return cell
    status = store.cell_status(cell.cell_id)
    done = store.done_units(cell.cell_id)
    units = [u for u in cell.units if u.unit_id not in done]
    quantize = cell.method != FP_METHOD and status != "done"
    if not quantize and not units:
        return None
    return Cell(cell.method, cell.bits, cell.key, cell.cell_id, units, quantize)


def _stored_file(grid: Grid, store, cell: Cell) -> Path | None:
    if cell.quantize or cell.method == FP_METHOD:
        return None
    rel = store.artifacts(cell.cell_id).get("model_file")
    path = Path(grid.cfg.runs) / rel if rel else None
    return path if path is not None and path.is_file() else None


def _fmt_s(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


def run_grid(cfg: RunConfig, progress=None, log=print) -> RunSummary:
    """The grid; with `seeds`, once per calibration seed (each its own calibration set and run folder)."""
    if not cfg.seeds:
        return _run_one(cfg, progress, log)
    validate_inputs(cfg)  # every input checked once, before the first seed's work
    summaries = []
    for s in cfg.seeds:
        log(f"[seed {s}] the grid with calibration seed {s} ({cfg.seeds.index(s) + 1}/{len(cfg.seeds)})")
        one = dataclasses.replace(cfg, seed=s, seeds=None, name=None if cfg.name is None else f"{cfg.name}-seed{s}")
        summaries.append(_run_one(one, progress, log))
    cells = [dataclasses.replace(c, method=f"{c.method} seed {s}" if c.method != FP_METHOD else c.method)
             for s, sm in zip(cfg.seeds, summaries) for c in sm.cells
             if not (c.method == FP_METHOD and s != cfg.seeds[0])]  # full precision does not depend on the seed
    last = summaries[-1]
    return RunSummary(last.run_dir, cfg.model, last.group_size, last.calib_manifest, cells)


def _run_one(cfg: RunConfig, progress=None, log=print) -> RunSummary:
    from ptqbench.grid.store import ResultsStore, process_owner

    grid = prepare(cfg, progress, log)
    store = ResultsStore(cfg.runs)
    owner = process_owner()
    outcomes: list[CellOutcome] = []
    cells = plan(grid)
    planned = {c.cell_id: c for c in cells}  # the whole cell, for the summary (pending ones hold only what is missing)
    pending: list[Cell] = []
    for cell in cells:
        todo = _missing(store, cell, cfg.force)
        if todo is None:
            rows = store.rows(cell_id=cell.cell_id, status="ok")
            outcomes.append(CellOutcome(cell.method, cell.bits, "cached", _metrics(rows, cell)))
            log(f"{cell.method} w{cell.bits}: already done (cell {cell.cell_id}), skipped; use --force to recompute")
        else:
            pending.append(todo)
    clock = dict(t0=time.perf_counter(), done=0, spent=0.0)
    stored: dict[str, Path | None] = {}

    def started(cell: Cell) -> Cell | None:
        """Claim the cell; the part of it still missing (another run may have done some), or None to skip."""
        busy = store.claim(cell.cell_id, dict(cell.key, run_id=grid.run_dir.name, env=grid.env, config=cfg.to_dict(),
                                              calib_manifest=grid.manifest, device=grid.env["device"]), owner)
        if busy:
            outcomes.append(CellOutcome(cell.method, cell.bits, "busy", error=f"claimed by {busy}"))
            log(f"[BUSY] {cell.method} w{cell.bits}: cell {cell.cell_id} is being computed by {busy}; left to it")
            return None
        todo = _missing(store, cell, cfg.force)
        if todo is None:
            store.release(cell.cell_id, owner)
            rows = store.rows(cell_id=cell.cell_id, status="ok")
            outcomes.append(CellOutcome(cell.method, cell.bits, "cached", _metrics(rows, planned[cell.cell_id])))
            log(f"{cell.method} w{cell.bits}: done meanwhile by another run (cell {cell.cell_id}), skipped")
            return None
        stored[cell.cell_id] = _stored_file(grid, store, todo)
        if todo.method != FP_METHOD and not todo.quantize and stored[cell.cell_id] is None:
            log(f"{cell.method} w{cell.bits}: its saved weights are gone, so it is quantized again for "
                f"{', '.join(u.name for u in todo.units)}")
            todo.quantize = True
        if todo.quantize:
            store.start_cell(cell.cell_id, dict(cell.key, run_id=grid.run_dir.name, env=grid.env, config=cfg.to_dict(),
                                                calib_manifest=grid.manifest, device=grid.env["device"]))
        i = pending.index(cell) + 1 if cell in pending else 0
        what = (["quantize"] if todo.quantize else []) + [u.name for u in todo.units]
        log(f"[{i}/{len(pending)}] {cell.method} w{cell.bits}: start ({', '.join(what)})")
        return todo

    def finished(cell: Cell, result: dict, seconds: float) -> None:
        errors = []
        try:
            if result["quant"] is not None:
                try:
                    store.finish_cell(cell.cell_id, result["quant"]["rows"], result["quant"]["artifacts"])
                except BadInput as e:  # the store refused a row: this cell failed, its units were not computed on it
                    store.fail_cell(cell.cell_id, str(e))
                    raise
            for u in result["units"]:
                store.record_unit(cell.cell_id, u["unit"], u["kind"], u["key"], u["rows"], u["error"], u.get("items"))
                if u["error"]:
                    errors.append(f"{u['kind']} {u['key'].get('task', 'latency')}: {u['error'].splitlines()[0]}")
        except BadInput as e:  # the store refused a row: this cell's problem, not the grid's
            errors.append(f"store: {e}")
        finally:
            store.release(cell.cell_id, owner)
        rows = store.rows(cell_id=cell.cell_id, status="ok")
        status = "failed" if errors else "done"
        outcomes.append(CellOutcome(cell.method, cell.bits, status, _metrics(rows, planned[cell.cell_id]), "; ".join(errors) or None,
                                    seconds))
        for e in errors:
            log(f"[FAILED] {cell.method} w{cell.bits}: {e}")
        _progress_line(cell, seconds, status)

    def failed(cell: Cell, error: str, detail: str, seconds: float) -> None:
        if store.cell_status(cell.cell_id) == "running":
            store.fail_cell(cell.cell_id, error + "\n" + detail)
        store.release(cell.cell_id, owner)
        outcomes.append(CellOutcome(cell.method, cell.bits, "failed", error=error, seconds=seconds))
        log(f"[FAILED] {cell.method} w{cell.bits}: {error}")
        _progress_line(cell, seconds, "failed")

    def _progress_line(cell: Cell, seconds: float, status: str) -> None:
        clock["done"] += 1
        clock["spent"] += seconds
        left = len(pending) - clock["done"]
        eta = clock["spent"] / clock["done"] * left
        log(f"[{clock['done']}/{len(pending)}] {cell.method} w{cell.bits}: {status} in {_fmt_s(seconds)}; "
            f"elapsed {_fmt_s(time.perf_counter() - clock['t0'])}, about {_fmt_s(eta)} left for {left} cell(s)")

    from ptqbench.grid.executors import get_executor

    get_executor(cfg.executor, address=cfg.address).run(grid, pending, started, finished, failed, progress,
                                                        stored_file=lambda c: stored.get(c.cell_id))
    outcomes += run_formats(grid, store, owner, log)  # latency: in this process, after the cells, all formats at once
    order = {(c.method, c.bits): i for i, c in enumerate(cells)}
    outcomes.sort(key=lambda o: order.get((o.method, o.bits), 0))
    return RunSummary(grid.run_dir, cfg.model, grid.group_size, grid.manifest, outcomes)


def _metrics(rows: list[dict], cell: Cell) -> dict:
    """The cell's figures for the summary: its recon rows and the rows of this run's units."""
    wanted = {u.unit_id for u in cell.units} | {""}
    return {f"{r['task']}/{r['metric']}": r["value"] for r in rows if (r.get("unit") or "") in wanted}
