"""The grid runner: one calibration set, every (method, bits) cell, results into the store.

A cell that fails is recorded as failed and the grid goes on; a cell already done (same model,
method, options, bits, group size, grid and calibration hash) is skipped unless `force`.
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ptqbench.config import RunConfig
from ptqbench.errors import BadInput
from ptqbench.harness.adapters import adapter_for
from ptqbench.harness.calibration import build_calibration
from ptqbench.harness.engine import EngineResult, quantize_model
from ptqbench.harness.measure import measure
from ptqbench.harness.models import load_model, resolve_device, resolve_dtype
from ptqbench.methods import QuantSpec, get_method

FP_METHOD = "fp"


@dataclass
class CellOutcome:
    method: str
    bits: int
    status: str  # done | failed | cached
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
class Cell:
    method: str
    bits: int
    key: dict  # the store's cell key
    cell_id: str


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
    run_dir: Path
    env: dict

    @property
    def manifest(self) -> dict:
        return self.calib.manifest


def prepare(cfg: RunConfig, progress=None, log=print, new_run_dir: bool = True) -> Grid:
    """Validate the whole grid before any expensive work, load the model, capture (or load) calibration."""
    from ptqbench.benchmarks.tasks import get_task
    from ptqbench.leaderboard.store import current_environment

    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    methods = {m: get_method(m) for m in cfg.method_list()}
    lm = load_model(cfg.model, dtype)
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
    task_names = cfg.tasks if cfg.tasks is not None else lm.tasks
    tasks = {t: get_task(t) for t in task_names}

    runs = Path(cfg.runs)
    run_dir = runs / (cfg.name or time.strftime("%Y%m%d-%H%M%S"))
    if new_run_dir:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=True))
    env = current_environment()
    env["device"] = str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)

    place_outside_decoder(lm.model, lm.adapter.decoder_path, device)  # embeddings + vision tower for capture
    calib = build_calibration(lm.model, lm.adapter, lm.processor, cfg.calib, cfg.calib_n, cfg.seq_len, cfg.seed,
                              batch_size=cfg.batch_size, image_root=cfg.image_root, cache_dir=runs / ".calib",
                              progress=progress, vision=cfg.quantize_vision)
    place_outside_decoder(lm.model, lm.adapter.decoder_path, torch.device("cpu"))
    if new_run_dir:
        (run_dir / "calibration.json").write_text(json.dumps(calib.manifest, indent=2))
        m = calib.manifest
        t = m["tokens"]
        share = t["vision"] / max(1, t["valid"])
        log(f"calibration {m['content_hash']}: {m['n_samples']} samples, {t['valid']} tokens: vision {t['vision']} "
            f"({share:.0%}), text {t['text']} ({1 - share:.0%}, of which answer {t['answer']})"
            + (f"; {m['background_patch_share']:.0%} of image patches are pure background"
               if m.get("background_patch_share") is not None else ""))
    return Grid(cfg, lm, calib, instances, tasks, group_size, device, run_dir, env)


def plan(grid: Grid) -> list[Cell]:
    """Full precision first (when there is a task or latency to measure), then every (method, bits)."""
    from ptqbench.leaderboard.store import ResultsStore

    cfg = grid.cfg
    cells = []
    if grid.tasks or cfg.latency:  # full precision: the accuracy and latency baseline
        key = dict(model=cfg.model, method=FP_METHOD, method_options={}, bits=16, group_size=0, sym=False, calib_hash="-")
        cells.append(Cell(FP_METHOD, 16, key, ResultsStore.cell_id(**key)))
    for (method, bits), inst in grid.instances.items():
        options = inst.options_dict()
        if cfg.quantize_vision:
            options["quantize_vision"] = True  # part of the cell's identity
        if cfg.max_blocks is not None:
            options["max_blocks"] = cfg.max_blocks  # a partial (cost) cell is never mistaken for a whole one
        key = dict(model=cfg.model, method=method, method_options=options, bits=bits, group_size=grid.group_size,
                   sym=cfg.sym, calib_hash=grid.manifest["content_hash"])
        cells.append(Cell(method, bits, key, ResultsStore.cell_id(**key)))
    return cells


def run_cell(grid: Grid, cell: Cell, progress=None) -> tuple[list[dict], dict]:
    """Quantize (unless full precision), measure, evaluate. Pure computation: returns (rows, artifacts)."""
    from ptqbench.harness.packing import pack, packed_nbytes, save_quantized

    cfg, lm, device = grid.cfg, grid.lm, grid.device
    seed_everything(cfg.seed)
    model = copy.deepcopy(lm.model)
    rows: list[dict] = []
    artifacts: dict = {}
    inst = grid.instances.get((cell.method, cell.bits))
    if inst is not None:
        with measure(device) as cost:
            result = quantize_model(model, adapter_for(model), grid.calib, inst, device=device, progress=progress,
                                    include_vision=cfg.quantize_vision, max_blocks=cfg.max_blocks)
        packed = {n: pack(qw) for n, qw in result.quantized.items()}
        other = {n: p for n, p in model.state_dict().items() if n.removesuffix(".weight") not in result.quantized}
        model_bytes = sum(packed_nbytes(t) for t in packed.values()) + state_bytes(other)
        extra = dict(calib_seconds=cost.seconds, calib_peak_bytes=cost.peak_bytes, model_bytes=model_bytes, kernel="fake")
        rows += [dict(task="recon", metric=m, value=v) for m, v in recon_metrics(result).items()]
        artifacts = dict(diagnostics=result.diagnostics, method_info=result.method_info, memory_kind=cost.kind)
        if cfg.save_model:
            out = grid.run_dir / "cells" / cell.cell_id
            out.mkdir(parents=True, exist_ok=True)
            save_quantized(out / "model.safetensors", result.quantized, other,
                           dict(model=cfg.model, method=cell.method, bits=cell.bits, options=cell.key["method_options"],
                                group_size=grid.group_size, sym=cfg.sym, calib_hash=grid.manifest["content_hash"]))
    else:
        extra = dict(model_bytes=state_bytes(model.state_dict()), kernel="fake")
    if grid.tasks or cfg.latency:  # a lazily built model has neither (refused in prepare)
        model.to(device)
    for t, task in grid.tasks.items():  # accuracy on the fake-quant weights (the method's exact output)
        rows += [dict(task=t, metric=m, value=v) for m, v in task.evaluate(model, lm.processor, n=cfg.eval_n, progress=progress).items()]
    if cfg.latency:  # then deploy real packed kernels in place and time them; every figure names its kernel
        from ptqbench.harness.latency import ROW_FIELDS, deploy_and_measure

        lat = deploy_and_measure(model, lm.processor, result.quantized if inst is not None else None, kernel=cfg.kernel,
                                 dtype=getattr(torch, cfg.infer_dtype), device=device, new_tokens=cfg.latency_tokens,
                                 batch_size=cfg.latency_batch)
        extra.update({k: lat[k] for k in ROW_FIELDS})
        artifacts["latency"] = {k: v for k, v in lat.items() if k not in ROW_FIELDS}
        if not rows:  # no task and full precision: the latency row alone
            rows.append(dict(task="deploy", metric="decode_tok_s", value=lat["decode_tok_s"]))
    del model
    return [dict(r, **extra) for r in rows], artifacts


def run_grid(cfg: RunConfig, progress=None, log=print) -> RunSummary:
    from ptqbench.leaderboard.store import ResultsStore

    grid = prepare(cfg, progress, log)
    store = ResultsStore(cfg.runs)
    outcomes: list[CellOutcome] = []
    pending: list[Cell] = []
    for cell in plan(grid):
        done = store.is_done(cell.cell_id) and not cfg.force
        rows = store.rows(cell_id=cell.cell_id, status="ok") if done else []
        was = next((r["calib_manifest"].get("model") for r in rows if r.get("calib_manifest")), None)
        if done and was and was != grid.manifest.get("model"):
            # same name, other weights (a retrained testbed, an edited checkpoint): the stored numbers
            # describe a model that is gone, so the cell is recomputed and its rows replaced
            log(f"[STALE] {cell.method} w{cell.bits}: cell {cell.cell_id} was computed on other weights of "
                f"{cfg.model} (model fingerprint {was}, now {grid.manifest.get('model')}); recomputing")
            done = False
        if done:
            outcomes.append(CellOutcome(cell.method, cell.bits, "cached", {f"{r['task']}/{r['metric']}": r["value"] for r in rows}))
            log(f"{cell.method} w{cell.bits}: already done (cell {cell.cell_id}), skipped; use --force to recompute")
        else:
            pending.append(cell)

    def started(cell: Cell) -> None:
        store.start_cell(cell.cell_id, dict(cell.key, run_id=grid.run_dir.name, env=grid.env, config=cfg.to_dict(),
                                            calib_manifest=grid.manifest, device=grid.env["device"]))

    def finished(cell: Cell, rows: list[dict], artifacts: dict, seconds: float) -> None:
        store.finish_cell(cell.cell_id, rows, artifacts)
        outcomes.append(CellOutcome(cell.method, cell.bits, "done", {f"{r['task']}/{r['metric']}": r["value"] for r in rows},
                                    seconds=seconds))

    def failed(cell: Cell, error: str, detail: str, seconds: float) -> None:
        store.fail_cell(cell.cell_id, error + "\n" + detail)
        outcomes.append(CellOutcome(cell.method, cell.bits, "failed", error=error, seconds=seconds))
        log(f"[FAILED] {cell.method} w{cell.bits}: {error}")

    from ptqbench.harness.executors import get_executor

    get_executor(cfg.executor, address=cfg.address).run(grid, pending, started, finished, failed, progress)
    order = {(c.method, c.bits): i for i, c in enumerate(plan(grid))}
    outcomes.sort(key=lambda o: order.get((o.method, o.bits), 0))
    return RunSummary(grid.run_dir, cfg.model, grid.group_size, grid.manifest, outcomes)
