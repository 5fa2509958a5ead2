"""Every setting of a run, declared once: its key, default, help text and check.

A run's configuration is six typed sections (model, quant, calib, eval, deploy, grid). Each field is declared
with `setting(...)`, and that declaration is the only one: `bench run`'s flags (cli.py) and the YAML keys
(`load_config`) are generated from it, and `RunConfig.validate` runs its check. The user-facing key of a
setting is flat (`--calib-n`, `calib_n:`) and stays what it has always been; inside the code it lives in
its section (`cfg.calib.n`). A stored or written configuration is the flat mapping (`to_dict`), so a
run folder's config.yaml is a valid `--config` file.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, get_type_hints

import yaml

from ptqbench.errors import BadInput, one_of
from ptqbench.methods.quant import ACT_SCHEMES, GRIDS, QuantSpec

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
KERNEL_CHOICES = ("auto", "int4pack", "int8pack", "dequant", "fake", "int8dyn")  # deploy/kernels.py implements each
EXECUTORS = ("local", "ray")
SCHEDULES = ("lockstep", "cells")
DEFAULT_MODEL = "testbed"  # the trained testbed VLM shipped in ptqbench/models/testbed_model


# ---- the declaration ---------------------------------------------------------------------------------
def setting(default: Any, help: str, *, key: str | None = None, check: Callable | None = None,
            flags: tuple[str, ...] = (), cli: bool = True):
    """A field of a config section. `key`: the flat YAML key and flag name when it differs from the field's;
    `check(value, flag)` raises BadInput; `flags`: typer's declarations when not just `--key`."""
    meta = dict(help=help, key=key, check=check, flags=flags, cli=cli)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def at_least(low: int, unset: str = ""):
    def check(value, flag):
        if value is not None and value < low:
            accepted = "a positive integer" if low == 1 and unset else f"an integer >= {low}"
            raise BadInput(f"{flag} {value!r} is not accepted; accepted: {accepted}{unset}")
    return check


def choice(options: tuple[str, ...]):
    def check(value, flag):
        if value not in options:
            raise one_of(flag, value, options)
    return check


def _check_bits(value, flag):
    if len(set(value)) != len(value):
        raise BadInput(f"bits {','.join(map(str, value))!r} name a width twice; accepted: each of 2..8 once")
    if not value:
        raise BadInput("bits is empty; accepted: one or more of 2..8")
    for b in value:
        QuantSpec(bits=b)  # the one definition of the accepted widths


def _check_act_bits(value, flag):
    if not value:
        raise BadInput("act-bits is empty; accepted: one or more of 4..8, or 16 (weights only)")
    if len(set(value)) != len(value):
        raise BadInput(f"act-bits {','.join(map(str, value))!r} name a width twice; accepted: each of 4..8 and 16 once")
    for a in value:
        QuantSpec(act_bits=a)  # the one definition of the accepted activation widths


SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
              "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_size(text: str, flag: str = "memory-budget") -> int:
    """'8GiB', '512MB', '2g', '1000000' -> bytes; one line naming the value otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in SIZE_UNITS or float(m.group(1)) <= 0:
        raise BadInput(f"{flag} {text!r} is not accepted; accepted: a positive size such as 8GiB, 512MiB, 2GB or a byte count")
    return int(float(m.group(1)) * SIZE_UNITS[unit])


def _check_size(value, flag):
    if value is not None:
        parse_size(value, flag)


def _check_seeds(value, flag):
    if value is not None and (not value or any(v < 1 for v in value) or len(set(value)) != len(value)):
        raise BadInput(f"seeds {','.join(map(str, value))!r} is not accepted; accepted: distinct integers >= 1, e.g. 1,2,3")


# ---- the sections --------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    source: str = setting(DEFAULT_MODEL, "testbed (default), tiny:<family>, random:<config.json>, a checkpoint dir or "
                          "cached hub id", key="model")
    device: str = setting("auto", "auto, cpu or cuda", check=choice(DEVICES))
    dtype: str = setting("auto", "compute dtype: auto (fp32 on CPU, bf16 on GPU), float32, bfloat16 or float16",
                         check=choice(DTYPES))
    allow_pickle: bool = setting(False, "load a checkpoint's pickled .bin weights (they can run code)",
                                 flags=("--allow-pickle",))


@dataclass
class QuantConfig:
    methods: list[str] | None = setting(None, "comma-separated methods (default: all registered)")
    bits: list[int] = setting([2, 3, 4], "comma-separated weight bits, 2-8 (default 2,3,4)", check=_check_bits)
    act_bits: list[int] = setting([16], "comma-separated activation bits, 4-8, or 16 (weights only, the default)",
                                  check=_check_act_bits)
    act_scheme: str = setting("token", "activation quantizer: token (per-token dynamic, the default) or tensor "
                              "(per-tensor static, scales calibrated by the engine)", check=choice(ACT_SCHEMES))
    group_size: int | None = setting(None, "-1 per-channel; default: the model's natural size (models/sources.py)")
    sym: bool = setting(False, "symmetric grid (default asymmetric)", flags=("--sym/--asym",))
    rounding: str = setting("minmax", "rounding grid: minmax (AWQ/MBQ convention, default) or gptq", key="grid",
                            check=choice(GRIDS))
    options: dict[str, dict[str, Any]] = setting({}, "per-method options", cli=False)
    quantize_vision: bool = setting(False, "also quantize the vision tower's linears",
                                    flags=("--quantize-vision/--no-quantize-vision",))
    max_blocks: int | None = setting(None, "quantize only the first N decoder blocks (cost runs on huge models)",
                                     check=at_least(1, " (or unset: every block)"))


@dataclass
class CalibConfig:
    source: str = setting("synthvqa", "synthvqa, synthvqa:caption, a ShareGPT4V .json/.jsonl, or a .txt", key="calib")
    image_root: str | None = setting(None, "image folder for a ShareGPT4V file (default: its folder)")
    n: int = setting(32, "calibration samples (default 32)", key="calib_n", check=at_least(1))
    seq_len: int = setting(512, "max tokens per calibration sample (default 512)", check=at_least(8))
    seed: int = setting(1, "seed for data, sampling and everything else (default 1; the generator refuses 0)",
                        check=at_least(1))
    seeds: list[int] | None = setting(None, "comma-separated calibration seeds: the grid once per seed, and the "
                                      "spread across them (replaces --seed)", check=_check_seeds)
    batch_size: int = setting(4, "calibration batch size (default 4)", check=at_least(1))


@dataclass
class EvalConfig:
    tasks: list[str] | None = setting(None, "comma-separated tasks (default: the model's; none for tiny models)")
    n: int | None = setting(None, "evaluation items per task (default: the task's)", key="eval_n",
                            check=at_least(1, ""))


@dataclass
class DeployConfig:
    latency: bool = setting(True, "time the deployed model per format (default on)", flags=("--latency/--no-latency",))
    kernel: str = setting("auto", "deployment kernel: auto, int4pack, int8pack, dequant, fake or int8dyn (weight-activation formats)", check=choice(KERNEL_CHOICES))
    infer_dtype: str = setting("bfloat16", "dtype of the timed deployment (default bfloat16: the one with fast CPU "
                               "kernels)", check=choice(DTYPES[1:]))
    latency_tokens: int = setting(8, "decode tokens timed (default 8)", check=at_least(2))
    latency_batch: int = setting(1, "batch size of the timing (default 1)", check=at_least(1))


@dataclass
class GridConfig:
    runs: str = setting("runs", "runs folder holding results.sqlite (default runs)")
    name: str | None = setting(None, "run folder name (default: a timestamp)")
    save_model: bool = setting(True, "save packed safetensors per cell", flags=("--save-model/--no-save-model",))
    force: bool = setting(False, "recompute cells already in the store", flags=("--force",))
    executor: str = setting("local", "local (default) or ray (pip install ptqbench[ray])", check=choice(EXECUTORS))
    address: str | None = setting(None, "Ray cluster address (default: a local Ray instance)")
    schedule: str = setting("lockstep", "lockstep (default): the cells quantized together in one pass over the blocks, "
                            "sharing what they share; cells: one after another", check=choice(SCHEDULES))
    memory_budget: str | None = setting(None, "host memory lockstep may hold for the cells' streams and model copies, "
                                        "e.g. 8GiB (default: half of the available RAM)", check=_check_size)
    profile: bool = setting(False, "print where the run's time went, phase by phase (always in profile.json)",
                            flags=("--profile",))


SECTIONS = dict(model=ModelConfig, quant=QuantConfig, calib=CalibConfig, eval=EvalConfig, deploy=DeployConfig,
                grid=GridConfig)


@dataclass(frozen=True)
class Setting:
    """One declared setting, as the CLI, the YAML loader and the validator see it."""

    key: str  # flat user-facing key (flag: --key with dashes)
    section: str
    attr: str
    type: Any
    default: Any
    help: str
    check: Callable | None
    flags: tuple[str, ...]
    cli: bool

    @property
    def flag(self) -> str:
        return self.key.replace("_", "-")


def settings() -> list[Setting]:
    out = []
    for section, cls in SECTIONS.items():
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            m = f.metadata
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append(Setting(m["key"] or f.name, section, f.name, hints[f.name], default, m["help"], m["check"],
                               m["flags"], m["cli"]))
    return out


SETTINGS = {s.key: s for s in settings()}


# ---- the whole configuration --------------------------------------------------------------------------
@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    grid: GridConfig = field(default_factory=GridConfig)

    def __post_init__(self):
        self.validate()

    @classmethod
    def from_flat(cls, **values) -> "RunConfig":
        """From flat keys (`bits=[2]`, `calib_n=8`, ...), the form of the flags, the YAML and `to_dict`."""
        sections: dict[str, dict] = {name: {} for name in SECTIONS}
        for key, value in values.items():
            if key not in SETTINGS:
                raise BadInput(f"config key {key!r} does not exist; accepted: {', '.join(s.flag for s in SETTINGS.values())}")
            s = SETTINGS[key]
            sections[s.section][s.attr] = value
        return cls(**{name: SECTIONS[name](**vals) for name, vals in sections.items()})

    def to_dict(self) -> dict:
        """The flat mapping of every setting (what config.yaml, the store and a Ray worker hold)."""
        return {s.key: _copy(getattr(getattr(self, s.section), s.attr)) for s in SETTINGS.values()}

    def replace(self, **values) -> "RunConfig":
        return RunConfig.from_flat(**{**self.to_dict(), **values})

    def method_list(self) -> list[str]:
        from ptqbench.methods import all_methods

        return list(self.quant.methods) if self.quant.methods is not None else list(all_methods())

    def validate(self) -> "RunConfig":
        for s in SETTINGS.values():  # every setting's type, then its own check
            _check_type(s.flag, getattr(getattr(self, s.section), s.attr), s.type)
        self._check_methods()
        for s in SETTINGS.values():
            if s.check is not None:
                s.check(getattr(getattr(self, s.section), s.attr), s.flag)
        q = self.quant
        if q.group_size is not None:
            QuantSpec(bits=q.bits[0], group_size=q.group_size)
        if self.grid.address is not None and self.grid.executor != "ray":
            raise BadInput(f"address {self.grid.address!r} is only used by the ray executor; accepted: --executor ray "
                           "with --address, or no --address")
        self._check_options()
        return self

    def _check_methods(self) -> None:
        from ptqbench.methods import all_methods

        known, methods = all_methods(), self.quant.methods
        if methods is not None and not methods:
            raise BadInput("methods is empty; accepted: one or more of " + ", ".join(sorted(known)) + " (or leave it unset: all)")
        for m in methods or []:
            if m not in known:
                raise one_of("method", m, sorted(known))
        if len(set(self.method_list())) != len(self.method_list()):
            raise BadInput(f"methods {','.join(self.method_list())!r} name a method twice; accepted: each method once")

    def _check_options(self) -> None:
        from ptqbench.methods import all_methods

        known = all_methods()
        for m, opts in self.quant.options.items():
            if m not in known:
                raise one_of("method in options", m, sorted(known))
            if m not in self.method_list():
                raise BadInput(f"options for method {m!r}, which is not in the grid, would be ignored; accepted: options of "
                               + ", ".join(self.method_list()))
            if not isinstance(opts, dict):
                raise BadInput(f"options for {m!r} must be a mapping of option -> value")


def _copy(value):
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return list(value) if isinstance(value, list) else value


def _check_type(flag: str, value, tp) -> None:
    """Minimal runtime check of the annotated type, so a YAML typo fails on load with one line."""
    origin = getattr(tp, "__origin__", None)
    args = getattr(tp, "__args__", ())
    if type(None) in args:
        if value is None:
            return
        tp = next(a for a in args if a is not type(None))
        origin, args = getattr(tp, "__origin__", None), getattr(tp, "__args__", ())
    if origin is list:
        if not isinstance(value, list):
            raise BadInput(f"{flag} {value!r} is not accepted; accepted: a list")
        for v in value:
            _check_type(flag, v, args[0])
        return
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise BadInput(f"{flag} {value!r} is not accepted; accepted: a mapping")
        return
    if tp is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise BadInput(f"{flag} {value!r} is not accepted; accepted: an integer")
    if tp is bool and not isinstance(value, bool):
        raise BadInput(f"{flag} {value!r} is not accepted; accepted: true or false")
    if tp is str and not isinstance(value, str):
        raise BadInput(f"{flag} {value!r} is not accepted; accepted: a string")


# ---- reading flags and YAML ------------------------------------------------------------------------------
def list_item_type(s: Setting):
    """int or str for a list-valued setting (given as "a,b,c" on the command line), else None."""
    tp = s.type
    args = [a for a in getattr(tp, "__args__", ()) if a is not type(None)]
    tp = args[0] if args and getattr(tp, "__origin__", None) is not list else tp
    return tp.__args__[0] if getattr(tp, "__origin__", None) is list else None


def _read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"config file {str(p)!r} does not exist; accepted: a YAML file with RunConfig fields")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise BadInput(f"config file {str(p)!r} is not valid YAML ({str(e).splitlines()[0]}); accepted: a YAML mapping of "
                       "RunConfig fields") from None
    if not isinstance(loaded, dict):
        raise BadInput(f"config file {str(p)!r} holds no mapping of fields; accepted: a YAML mapping of RunConfig fields")
    data = {}
    for k, v in loaded.items():
        k = str(k).replace("-", "_")
        if k in SECTIONS and k not in SETTINGS and isinstance(v, dict):  # a section: `quant: {bits: 2}`
            data.update({str(sk).replace("-", "_"): sv for sk, sv in v.items()})
        else:
            data[k] = v
    return data


def load_config(path: str | Path | None, overrides: dict[str, Any]) -> RunConfig:
    """YAML keys (flat, dashes or underscores, or grouped by section) overlaid by the flags that were given."""
    data = _read_yaml(path) if path is not None else {}
    for k in data:
        if k not in SETTINGS:
            raise BadInput(f"config key {k!r} does not exist; accepted: {', '.join(s.flag for s in SETTINGS.values())}")
    for k, v in list(data.items()):  # YAML may give "gptq,vlmq" like the flag does
        item = list_item_type(SETTINGS[k])
        if item is not None and isinstance(v, str):
            data[k] = parse_list(v, item, k)
        elif item is int and isinstance(v, int) and not isinstance(v, bool):
            data[k] = [v]
    options = overrides.pop("options", None) or {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    if options:  # flags extend the YAML's per-method options rather than replace them
        merged = {m: dict(o) for m, o in (data.get("options") or {}).items()} if isinstance(data.get("options"), dict) else {}
        for m, o in options.items():
            merged.setdefault(m, {}).update(o)
        data["options"] = merged
    return RunConfig.from_flat(**data)


def parse_list(text: str, cast, what: str) -> list:
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            out.append(cast(part))
        except ValueError:
            raise BadInput(f"{what} value {part!r} is not accepted; accepted: a comma-separated list of {cast.__name__}") from None
    return out


def parse_option(text: str) -> tuple[str, str, Any]:
    """`method.key=value` with value parsed as YAML (so true/0.25/128 get their types)."""
    head, eq, value = text.partition("=")
    method, dot, key = head.partition(".")
    if not eq or not dot or not method or not key:
        raise BadInput(f"option {text!r} is not accepted; accepted: METHOD.KEY=VALUE, e.g. gptq.act_order=true")
    try:
        return method, key, yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise BadInput(f"option {text!r} has a value that is not valid YAML ({str(e).splitlines()[0]}); "
                       "accepted: METHOD.KEY=VALUE with a YAML scalar, e.g. gptaq.alpha=0.25") from None
