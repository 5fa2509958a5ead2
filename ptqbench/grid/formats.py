"""Latency belongs to a deployment format (bits, activation bits, group size, sym, kernel, dtype, batch), not
to a method: each format is timed once per model, on the model quantized to that format with RTN (a kernel's
speed does not depend on the values it multiplies), and the leaderboard shows it on every method's row of that
format. All formats a store lacks are timed together, in interleaved rounds, so machine load hits them alike.
A weight-activation format (W4A8, W8A8) runs its activation quantizer in every quantized linear: the integer
kernel `int8dyn` where it is exact, else the weight kernel after a simulated quantizer (`<kernel>+fakeA8` in
the kernel column: deploy/kernels.py)."""

from __future__ import annotations

import copy
import time

import torch

from ptqbench.deploy.kernels import deploy
from ptqbench.deploy.latency import measure_interleaved
from ptqbench.errors import BadInput, one_line
from ptqbench.grid.cell import nonfinite
from ptqbench.grid.plan import FORMAT_METHOD, FP_METHOD, Cell, CellOutcome, Grid, Unit, act_options, fp_key, identity
from ptqbench.grid.store import ResultsStore
from ptqbench.engine.blockwise import quantize_model
from ptqbench.methods import QuantSpec, get_method
from ptqbench.methods.quant import quantize_rtn
from ptqbench.models.adapters import adapter_for

LATENCY_PROTOCOL = 1  # bump when latency.measure_inference's protocol (prompt, warm-up, repeats) changes
STORED_FIELDS = ("model_bytes", "prefill_ms", "prefill_ms_spread", "decode_tok_s", "decode_tok_s_spread",
                 "infer_peak_bytes", "kernel")


def plan_formats(grid: Grid) -> list[Cell]:
    """The deployment formats of the grid, full precision first, each a cell with one deploy unit."""
    cfg = grid.cfg
    if not cfg.deploy.latency:
        return []
    d = cfg.deploy
    key = dict(kind="deploy", kernel=d.kernel, infer_dtype=d.infer_dtype, batch=d.latency_batch,
               new_tokens=d.latency_tokens, device_type=grid.device.type, protocol=LATENCY_PROTOCOL)
    unit = Unit("deploy", "deploy", key, ResultsStore.unit_id(key))
    fp = fp_key(grid)
    cells = [Cell(FP_METHOD, 16, fp, ResultsStore.cell_id(**fp), [unit], quantize=False)]
    for bits in cfg.quant.bits:
        for act_bits in cfg.quant.act_bits:
            # the method cells' convention (plan.act_options): act_bits in the options only when activations are
            # quantized, act_scheme only when static, so a weight-only format keeps its key (and its stored
            # latency), W4A8 never serves W4, and a static W4A8t never serves the dynamic W4A8
            options = act_options(act_bits, cfg.quant.act_scheme)
            if cfg.quant.quantize_vision:
                options["quantize_vision"] = True
            fkey = dict(identity(grid), method=FORMAT_METHOD, method_options=options, bits=bits,
                        group_size=grid.group_size, sym=cfg.quant.sym, grid=cfg.quant.rounding, calib_hash="-")
            cells.append(Cell(FORMAT_METHOD, bits, fkey, ResultsStore.cell_id(**fkey), [unit], quantize=False,
                              act_bits=act_bits, act_scheme=cfg.quant.act_scheme if act_bits < 16 else "token"))
    return cells


def format_model(grid: Grid, cell: Cell):
    """The base model deployed in the cell's format: RTN weights packed for the kernel (or dense for FP); a
    weight-activation format's layers quantize their inputs (the QuantSpec carries act_bits)."""
    cfg = grid.cfg
    model = copy.deepcopy(grid.lm.model)
    quantized = {}
    if cell.method == FORMAT_METHOD:
        adapter = adapter_for(model)
        spec = QuantSpec(bits=cell.bits, group_size=grid.group_size, sym=cfg.quant.sym, grid=cfg.quant.rounding,
                         act_bits=cell.act_bits, act_scheme=cell.act_scheme)
        if spec.quantizes_activations and spec.act_scheme == "tensor":
            # static activation scales need calibrating: RTN through the engine, which observes them
            quantized = quantize_model(model, adapter, grid.calib, get_method("rtn")(spec), device=grid.device,
                                       include_vision=cfg.quant.quantize_vision).quantized
        else:
            stacks = [(adapter.decoder_path, adapter.decoder_layers())]
            if cfg.quant.quantize_vision:
                stacks.append((adapter.vision_blocks_path, adapter.vision_blocks()))
            for prefix, blocks in stacks:
                for i, blk in enumerate(blocks):
                    for n, lin in adapter.block_linears(blk).items():
                        quantized[f"{prefix}.{i}.{n}"] = qw = quantize_rtn(lin.weight.data.float(), spec)
                        lin.weight.data = qw.dequantize().to(lin.weight.dtype)
    dtype = getattr(torch, cfg.deploy.infer_dtype)
    model.to(dtype).to(grid.device)
    if quantized:
        deploy(model, quantized, cfg.deploy.kernel, dtype=dtype)
    return model.eval()


def _claim_formats(grid: Grid, store, owner: str, log) -> list[tuple[str, Cell]]:
    todo = []
    for cell in plan_formats(grid):
        label = "FP" if cell.method == FP_METHOD else format_label(cell.bits, cell.act_bits, grid.group_size,
                                                                   cell.act_scheme)
        if not grid.cfg.grid.force and cell.units[0].unit_id in store.done_units(cell.cell_id):
            continue
        busy = store.claim(cell.cell_id, dict(cell.key, run_id=grid.run_dir.name, env=grid.env, config=grid.cfg.to_dict(),
                                              device=grid.env["device"]), owner)
        if busy:
            log(f"[BUSY] latency {label}: being measured by {busy}; left to it")
            continue
        todo.append((label, cell))
    return todo


def _record(store, label: str, cell: Cell, r) -> CellOutcome:
    """Store one format's measurement (or its failure) and say how it went."""
    unit = cell.units[0]
    try:
        if isinstance(r, BaseException):
            raise BadInput(one_line(r))
        bad = nonfinite({k: r[k] for k in ("prefill_ms", "decode_tok_s")})
        if bad:
            raise FloatingPointError(f"latency {label}: {bad}")
        fields = {k: r[k] for k in STORED_FIELDS}
        rows = [dict(task="deploy", metric="decode_tok_s", value=r["decode_tok_s"], n=r["repeats"], **fields),
                dict(task="deploy", metric="prefill_ms_cv", value=r["prefill_ms_cv"], n=r["repeats"]),
                dict(task="deploy", metric="decode_tok_s_cv", value=r["decode_tok_s_cv"], n=r["repeats"])]
        store.record_unit(cell.cell_id, unit.unit_id, "deploy", unit.key, rows)
        return CellOutcome(f"latency {label}", cell.bits, "done",
                           {"deploy/decode_tok_s": r["decode_tok_s"], "deploy/prefill_ms": r["prefill_ms"]}, act_bits=cell.act_bits)
    except (BadInput, FloatingPointError) as e:
        store.record_unit(cell.cell_id, unit.unit_id, "deploy", unit.key, [], error=str(e))
        return CellOutcome(f"latency {label}", cell.bits, "failed", error=str(e), act_bits=cell.act_bits)


def format_label(bits: int, act_bits: int, group_size: int, act_scheme: str = "token") -> str:
    """A format in log lines: W4 g64, W4A8 g64, W8A8 per-channel, W4A8t g64 (per-tensor static activations)."""
    act = f"A{act_bits}" + ("t" if act_scheme == "tensor" else "") if act_bits < 16 else ""
    return f"W{bits}{act}" + (" per-channel" if group_size == -1 else f" g{group_size}")


def run_formats(grid: Grid, store, owner: str, log) -> list[CellOutcome]:
    """Time every format whose latency the store lacks (weight-only and weight-activation alike), all in one
    interleaved measurement."""
    todo = _claim_formats(grid, store, owner, log)
    if not todo:
        return []
    t0 = time.perf_counter()
    log(f"[latency] timing {len(todo)} format(s) in interleaved rounds: {', '.join(label for label, _ in todo)}")
    models, results = {}, {}
    for label, cell in todo:
        try:
            models[label] = format_model(grid, cell)
        except Exception as e:  # noqa: BLE001 - that format fails, the others are timed
            results[label] = e
    d = grid.cfg.deploy
    results.update(measure_interleaved(models, grid.lm.processor, device=grid.device, new_tokens=d.latency_tokens,
                                       batch_size=d.latency_batch))
    models.clear()
    outcomes = []
    for label, cell in todo:
        try:
            outcomes.append(_record(store, label, cell, results[label]))
        finally:
            store.release(cell.cell_id, owner)
        if outcomes[-1].status == "failed":
            log(f"[FAILED] latency {label}: {outcomes[-1].error}")
    done = [o for o in outcomes if o.status == "done"]
    log(f"[latency] {len(done)}/{len(todo)} format(s) timed in {fmt_s(time.perf_counter() - t0)}")
    return outcomes


def fmt_s(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"
