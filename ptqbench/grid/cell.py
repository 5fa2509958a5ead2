"""One cell: quantize the model with the cell's method (or reload its stored weights), then compute each of
its missing units. Pure computation returning plain data, so any executor can run it anywhere."""

from __future__ import annotations

import copy
import math
import time
import traceback
from pathlib import Path

import torch

from ptqbench.deploy.measure import measure
from ptqbench.deploy.packing import load_quantized, pack, packed_nbytes, save_quantized
from ptqbench.engine.blockwise import EngineResult, quantize_model
from ptqbench.errors import one_line
from ptqbench.eval.tasks import seed_everything
from ptqbench.grid.plan import EVAL_BATCH, FP_METHOD, Cell, Grid
from ptqbench.methods.quant import QuantSpec, QuantizedWeight, install_format_quantizers
from ptqbench.models.adapters import adapter_for

CELL_FILE = "model.safetensors"


def nonfinite(values: dict) -> str | None:
    bad = [k for k, v in values.items() if not (isinstance(v, (int, float)) and math.isfinite(v))]
    return f"non-finite value(s) {', '.join(f'{k}={values[k]!r}' for k in bad[:3])}" if bad else None


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


def score_interval(score) -> dict:
    """The 95% interval stored with a task score: Wilson for a proportion, a bootstrap over items for a mean."""
    from ptqbench.eval.stats import bootstrap_mean, wilson

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


def _save(grid: Grid, cell: Cell, quantized: dict, other: dict) -> str:
    cfg = grid.cfg
    out = cell_file(grid, cell)
    out.parent.mkdir(parents=True, exist_ok=True)
    # fp32 scales: a later task evaluated on the reloaded weights sees exactly these weights
    save_quantized(out, quantized, other,
                   dict(model=cfg.model.source, method=cell.method, bits=cell.bits, options=cell.key["method_options"],
                        group_size=grid.group_size, sym=cfg.quant.sym, calib_hash=grid.calib.hash),
                   scale_dtype=torch.float32)
    return str(out.relative_to(Path(cfg.grid.runs)))


def quantize(grid: Grid, cell: Cell, model, progress) -> tuple[list[dict], dict, dict]:
    """Quantize `model` in place with the cell's method: (recon rows, artifacts, the quantized linears)."""
    cfg, device = grid.cfg, grid.device
    inst = grid.instances[cell.instance_key]
    with grid.profile.phase("quantization"), measure(device) as cost:
        result = quantize_model(model, adapter_for(model), grid.calib, inst, device=device, progress=progress,
                                include_vision=cfg.quant.quantize_vision, max_blocks=cfg.quant.max_blocks)
    return record_quantization(grid, cell, model, result, cost.seconds, cost.peak_bytes, cost.kind)


def record_quantization(grid: Grid, cell: Cell, model, result: EngineResult, seconds: float, peak_bytes: int,
                        memory_kind: str, schedule: dict | None = None) -> tuple[list[dict], dict, dict]:
    """The stored record of a quantized model: recon rows, artifacts (the packed file saved), its linears."""
    for name, qw in result.quantized.items():  # a NaN weight fails this cell, not the grid
        if not (torch.isfinite(qw.scale).all() and torch.isfinite(qw.zero).all()):
            raise FloatingPointError(f"non-finite scale or zero in {name}")
    packed = {n: pack(qw) for n, qw in result.quantized.items()}
    other = {n: p for n, p in model.state_dict().items() if n.removesuffix(".weight") not in result.quantized}
    model_bytes = sum(packed_nbytes(t) for t in packed.values()) + state_bytes(other)
    recon = recon_metrics(result)
    bad = nonfinite(recon)
    if bad:
        raise FloatingPointError(f"reconstruction error: {bad}")
    extra = dict(calib_seconds=seconds, calib_peak_bytes=peak_bytes, model_bytes=model_bytes)
    rows = [dict(task="recon", metric=m, value=v, **extra) for m, v in recon.items()]
    artifacts = dict(diagnostics=result.diagnostics, method_info=result.method_info, memory_kind=memory_kind,
                     schedule=schedule or dict(kind="cells"))
    if grid.cfg.grid.save_model:
        with grid.profile.phase("saving"):
            artifacts["model_file"] = _save(grid, cell, result.quantized, other)
    return rows, artifacts, dict(result.quantized)


def reload(model, path: Path) -> dict[str, QuantizedWeight]:
    """Put a cell's saved packed weights into `model` (its fake-quant form, exactly as quantized); returns the
    quantized linears by name (with a static format's calibrated activation scales in their extras)."""
    weights, other, _ = load_quantized(path)
    unexpected = model.load_state_dict(other, strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f"saved cell {path} holds parameters the model lacks: {unexpected[:3]}")
    for name, qw in weights.items():
        lin = model.get_submodule(name)
        lin.weight.data = qw.dequantize().to(lin.weight.device, lin.weight.dtype)
    return weights


def install_cell_activations(cell: Cell, model, weights) -> list:
    """A weight-activation cell is evaluated as deployed: its activation quantizer (fake-quant: per token, or
    per tensor with the calibrated scales the weights carry) at the input of every linear it quantized
    (`weights`: name -> QuantizedWeight, as the engine or the saved file gives them; a list of names is enough
    for a per-token cell). Returns the hook handles (none for a weight-only cell)."""
    if cell.act_bits >= 16:
        return []
    spec = QuantSpec(act_bits=cell.act_bits, act_scheme=cell.act_scheme)
    named = weights if isinstance(weights, dict) else dict.fromkeys(weights)
    return install_format_quantizers([(model.get_submodule(n), qw) for n, qw in named.items()], spec)


def _score(grid: Grid, model, unit, progress) -> tuple[list[dict], dict]:
    """A task unit on the fake-quant weights (the method's exact output): (rows, per-item scores)."""
    task = grid.tasks[unit.name]
    seed_everything(grid.cfg.calib.seed)
    scores = task.scores(model, grid.lm.processor, n=grid.cfg.eval.n, batch_size=EVAL_BATCH, progress=progress,
                         cache=grid.eval_cache)
    bad = nonfinite({m: sc.value for m, sc in scores.items()})
    if bad:
        raise FloatingPointError(f"task {unit.name}: {bad}")
    rows = [dict(task=unit.name, metric=m, value=sc.value, n=sc.n, **score_interval(sc)) for m, sc in scores.items()]
    items = {m: dict(kind=sc.kind, items=sc.items, weights=sc.weights) for m, sc in scores.items() if sc.items}
    return rows, items


def run_cell(grid: Grid, cell: Cell, progress=None, stored_file: Path | None = None, quantized=None) -> dict:
    """Quantize the cell (or reload its stored weights, or take `quantized`: (model, rows, artifacts, weights) from
    a lockstep pass), then compute each of its missing units. Returns {"quant": {"rows", "artifacts"} | None,
    "units": [...]}, each unit {"unit", "kind", "key", "rows", "error"}. An exception in the quantization
    propagates (the cell fails); one in a unit is that unit's error."""
    seed_everything(grid.cfg.calib.seed)
    out: dict = {"quant": None, "units": []}
    if quantized is not None:  # quantized in a lockstep pass
        model, rows, artifacts, weights = quantized
        out["quant"] = dict(rows=rows, artifacts=artifacts)
    else:
        model = copy.deepcopy(grid.lm.model)
        if cell.method != FP_METHOD and (cell.quantize or stored_file is None):
            rows, artifacts, weights = quantize(grid, cell, model, progress)
            out["quant"] = dict(rows=rows, artifacts=artifacts)
        elif cell.method != FP_METHOD:
            weights = reload(model, stored_file)
    if cell.method != FP_METHOD:
        install_cell_activations(cell, model, weights)  # the model is this cell's copy: the hooks go with it
    if cell.units:
        model.to(grid.device)
    for unit in cell.units:
        out["units"].append(_run_unit(grid, model, unit, progress))
    del model
    return out


def _run_unit(grid: Grid, model, unit, progress) -> dict:
    t0 = time.perf_counter()
    done = dict(unit=unit.unit_id, kind=unit.kind, key=unit.key)
    try:
        if unit.kind != "eval":
            raise ValueError(f"unit kind {unit.kind!r} is not run per cell")  # deployment: grid/formats.py
        with grid.profile.phase("evaluation"):
            rows, items = _score(grid, model, unit, progress)
        return dict(done, rows=rows, error=None, items=items, seconds=time.perf_counter() - t0)
    except Exception as e:  # this unit failed; the cell's other results stand
        return dict(done, rows=[], error=one_line(e) + "\n" + traceback.format_exc(limit=6),
                    seconds=time.perf_counter() - t0)
