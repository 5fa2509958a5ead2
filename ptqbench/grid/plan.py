"""A grid prepared and planned: every input checked, the model loaded, the calibration set captured once;
then its cells, each keyed by everything that produced it, with the units (task scores) it owes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ptqbench.config import RunConfig
from ptqbench.engine.calibration import CalibSet, build_calibration
from ptqbench.errors import BadInput
from ptqbench.eval.cache import EvalCache
from ptqbench.eval.tasks import seed_everything
from ptqbench.grid.preflight import make_run_dir, validate_inputs, write_atomic
from ptqbench.grid.profile import Profile
from ptqbench.grid.store import FORMAT_METHOD, FP_METHOD, ResultsStore, current_environment  # noqa: F401 (re-exported)
from ptqbench.methods import Method, QuantSpec, get_method
from ptqbench.models.sources import LoadedModel, load_model, resolve_device, resolve_dtype

EVAL_BATCH = 16  # items per evaluation batch (part of a task unit's identity: padding can move a logit)


def format_name(bits: int, act_bits: int = 16, act_scheme: str = "token") -> str:
    """A cell's format in log lines and summaries: w4 (weights only, as always), w4a8 (weights and per-token
    dynamic activations), w4a8t (per-tensor static activations)."""
    return f"w{bits}" + (f"a{act_bits}" + ("t" if act_scheme == "tensor" else "") if act_bits < 16 else "")


def act_options(act_bits: int, act_scheme: str) -> dict:
    """The activation quantizer in a cell's options: nothing for weights only (its key is what it always was),
    act_bits for W/A, and act_scheme only when static ("tensor"), so per-token W/A keys stay as they were."""
    if act_bits >= 16:
        return {}
    return dict(act_bits=act_bits, **({"act_scheme": act_scheme} if act_scheme != "token" else {}))


@dataclass
class CellOutcome:
    method: str
    bits: int
    status: str  # done | failed | cached | busy (claimed by another live run)
    metrics: dict = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    act_bits: int = 16
    act_scheme: str = "token"

    @property
    def fmt(self) -> str:
        return format_name(self.bits, self.act_bits, self.act_scheme)


@dataclass
class RunSummary:
    run_dir: Path
    model: str
    group_size: int
    calib_manifest: dict
    cells: list[CellOutcome]


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
    act_bits: int = 16  # activation bits (16: weights only)
    act_scheme: str = "token"  # the activation quantizer: per-token dynamic or per-tensor static ("tensor")

    @property
    def fmt(self) -> str:
        return format_name(self.bits, self.act_bits, self.act_scheme)

    @property
    def instance_key(self) -> tuple[str, int, int]:
        """The key of the cell's method instance in `Grid.instances`."""
        return (self.method, self.bits, self.act_bits)


@dataclass
class Grid:
    """Everything a cell needs, prepared (and validated) once: model, calibration, methods, tasks."""

    cfg: RunConfig
    lm: LoadedModel
    calib: CalibSet
    instances: dict[tuple[str, int, int], Method]  # (method, bits, act_bits) -> its instance
    tasks: dict
    group_size: int
    device: torch.device
    dtype: torch.dtype
    run_dir: Path
    env: dict
    profile: Profile = field(default_factory=Profile)  # where the run's time goes (grid/profile.py)
    memo: dict = field(default_factory=dict)  # whole-run statistics shared by lockstep cells (RunView.memo)
    eval_cache: EvalCache | None = None  # what scoring shares across the grid's cells (None: nothing shared)

    @property
    def manifest(self) -> dict:
        return self.calib.manifest


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


# ---- prepare ------------------------------------------------------------------------------------------
def _check_lazy(cfg: RunConfig, lm: LoadedModel, methods: dict) -> None:
    """A lazily built random-weight model (cost runs): nothing to score, deploy or save, no whole-model pass."""
    whole = [m for m, cls in methods.items() if cls.needs_whole_model]
    source = cfg.model.source
    if whole:
        raise BadInput(f"method {whole[0]!r} needs the whole model before quantizing (gradient pass), which a lazily built "
                       f"{source!r} does not hold; accepted: " + ", ".join(m for m, c in methods.items() if not c.needs_whole_model))
    if cfg.eval.tasks:
        raise BadInput(f"tasks {','.join(cfg.eval.tasks)!r} cannot score random weights ({source!r}); accepted: no tasks")
    if cfg.deploy.latency:
        raise BadInput(f"latency cannot be measured on a lazily built {source!r} (its blocks are not in memory); accepted: --no-latency")
    if cfg.grid.save_model:
        raise BadInput(f"saving the quantized random-weight {source!r} is refused (its size is the checkpoint's); accepted: --no-save-model")


def _quantized_widths(cfg: RunConfig, lm: LoadedModel, methods: dict) -> set[int]:
    """Input widths of every linear the grid quantizes (each must take the group size)."""
    adapter = lm.adapter
    widths = {m.in_features for blk in adapter.decoder_layers() for m in adapter.block_linears(blk).values()}
    if cfg.quant.quantize_vision:
        for m, cls in methods.items():
            if not cls.supports_vision:
                raise BadInput(f"method {m!r} cannot quantize the vision tower (it needs the decoder's block structure); "
                               "accepted with --quantize-vision: " + ", ".join(n for n, c in methods.items() if c.supports_vision))
        if adapter.vision_blocks() is None:
            raise BadInput(f"model {cfg.model.source!r} has no known vision tower; accepted: quantize-vision false")
        for blk in adapter.vision_blocks():
            widths |= {m.in_features for m in adapter.block_linears(blk).values()}
    return widths


def _instances(cfg: RunConfig, lm: LoadedModel, methods: dict, group_size: int) -> dict:
    q = cfg.quant
    specs = {(b, a): QuantSpec(bits=b, group_size=group_size, sym=q.sym, grid=q.rounding, act_bits=a,
                               act_scheme=q.act_scheme)
             for b in q.bits for a in q.act_bits}
    specs[(q.bits[0], q.act_bits[0])].check_widths(sorted(_quantized_widths(cfg, lm, methods)))
    return {(m, b, a): cls(spec, **q.options.get(m, {})) for m, cls in methods.items() for (b, a), spec in specs.items()}


def _capture(cfg: RunConfig, lm: LoadedModel, device: torch.device, progress, log) -> CalibSet:
    c = cfg.calib
    place_outside_decoder(lm.model, lm.adapter.decoder_path, device)  # embeddings + vision tower for capture
    calib = build_calibration(lm.model, lm.adapter, lm.processor, c.source, c.n, c.seq_len, c.seed,
                              batch_size=c.batch_size, image_root=c.image_root, cache_dir=Path(cfg.grid.runs) / ".calib",
                              progress=progress, vision=cfg.quant.quantize_vision, warn=log)
    place_outside_decoder(lm.model, lm.adapter.decoder_path, torch.device("cpu"))
    return calib


def _write_run_dir(cfg: RunConfig, calib: CalibSet, log) -> Path:
    """The run's first write, once every input has been checked and the calibration set captured."""
    run_dir = make_run_dir(Path(cfg.grid.runs), cfg.grid.name)
    write_atomic(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=True))
    write_atomic(run_dir / "calibration.json", json.dumps(calib.manifest, indent=2))
    m = calib.manifest
    t = m["tokens"]
    share = t["vision"] / max(1, t["valid"])
    log(f"calibration {m['content_hash']}: {m['n_samples']} samples, {t['valid']} tokens: vision {t['vision']} "
        f"({share:.0%}), text {t['text']} ({1 - share:.0%}, of which answer {t['answer']})"
        + (f"; {m['background_patch_share']:.0%} of image patches are pure background"
           if m.get("background_patch_share") is not None else ""))
    return run_dir


def prepare(cfg: RunConfig, progress=None, log=print, new_run_dir: bool = True) -> Grid:
    """Validate the whole grid before any expensive work, load the model, capture (or load) calibration.
    Nothing is written before every input has been checked."""
    from ptqbench.eval.registry import get_task

    profile = Profile()
    seed_everything(cfg.calib.seed)
    if new_run_dir:
        methods, device = validate_inputs(cfg)
    else:  # a worker of a grid its driver has validated: the store, runs folder and sources are the driver's
        methods, device = {m: get_method(m) for m in cfg.method_list()}, resolve_device(cfg.model.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    with profile.phase("model load"):
        lm = load_model(cfg.model.source, dtype, allow_pickle=cfg.model.allow_pickle)
    lm.adapter.image_token_id()  # a model without an image token is refused here
    if lm.lazy:
        _check_lazy(cfg, lm, methods)
    group_size = cfg.quant.group_size if cfg.quant.group_size is not None else lm.group_size
    instances = _instances(cfg, lm, methods, group_size)
    tasks = {t: get_task(t) for t in (cfg.eval.tasks if cfg.eval.tasks is not None else lm.tasks)}
    env = current_environment()
    env["device"] = str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)
    with profile.phase("calibration"):
        calib = _capture(cfg, lm, device, progress, log)
    run_dir = _write_run_dir(cfg, calib, log) if new_run_dir else Path(cfg.grid.runs) / (cfg.grid.name or "worker")
    # the vision tower's outputs are reused only while no cell quantizes it
    eval_cache = None if lm.lazy else EvalCache(lm.model, None if cfg.quant.quantize_vision else lm.adapter.vision_tower_path)
    return Grid(cfg, lm, calib, instances, tasks, group_size, device, dtype, run_dir, env, profile, eval_cache=eval_cache)


# ---- the plan: cells and their units ------------------------------------------------------------------
def units(grid: Grid) -> list[Unit]:
    out = []
    for name, task in grid.tasks.items():
        key = dict(kind="eval", **task.identity(grid.cfg.eval.n), batch_size=EVAL_BATCH)
        out.append(Unit("eval", name, key, ResultsStore.unit_id(key)))
    return out


def identity(grid: Grid) -> dict:
    """What every cell of the grid shares: the model (and its weights' fingerprint), dtype and device kind."""
    return dict(model=grid.cfg.model.source, model_fingerprint=grid.manifest.get("model"),
                dtype=str(grid.dtype).removeprefix("torch."), device_type=grid.device.type)


def fp_key(grid: Grid) -> dict:
    return dict(identity(grid), method=FP_METHOD, method_options={}, bits=16, group_size=0, sym=False, calib_hash="-")


def plan(grid: Grid) -> list[Cell]:
    """Full precision first (when there is a task to score), then every (method, bits, act_bits). A weight-only
    cell's key is what it always was; a weight-activation cell's options gain `act_bits` (a new identity)."""
    cfg, shared, todo = grid.cfg, identity(grid), units(grid)
    cells = []
    if todo:  # full precision: the accuracy baseline
        key = fp_key(grid)
        cells.append(Cell(FP_METHOD, 16, key, ResultsStore.cell_id(**key), list(todo), quantize=False))
    for (method, bits, act_bits), inst in grid.instances.items():
        options = inst.options_dict()
        options.update(act_options(act_bits, cfg.quant.act_scheme))
        if cfg.quant.quantize_vision:
            options["quantize_vision"] = True  # part of the cell's identity
        if cfg.quant.max_blocks is not None:
            options["max_blocks"] = cfg.quant.max_blocks  # a partial (cost) cell is never mistaken for a whole one
        key = dict(shared, method=method, method_options=options, bits=bits, group_size=grid.group_size,
                   sym=cfg.quant.sym, grid=cfg.quant.rounding, seed=cfg.calib.seed, calib_hash=grid.calib.hash)
        cells.append(Cell(method, bits, key, ResultsStore.cell_id(**key), list(todo), act_bits=act_bits,
                          act_scheme=inst.spec.act_scheme))
    return cells
