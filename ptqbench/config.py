"""Run configuration: one typed dataclass; YAML files hold the same fields as the CLI flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from ptqbench.errors import BadInput, one_of
from ptqbench.methods.quant import GRIDS, QuantSpec

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_MODEL = "testbed"  # the trained testbed VLM shipped in ptqbench/models/testbed_model


@dataclass
class RunConfig:
    model: str = DEFAULT_MODEL  # "testbed", "tiny:<family>", a local checkpoint dir, or a hub id in the local cache
    methods: list[str] | None = None  # None = every registered method (an empty list is refused)
    bits: list[int] = field(default_factory=lambda: [2, 3, 4])
    group_size: int | None = None  # None = the model's natural choice (testbed 64, tiny 32, else 128); -1 = per-channel
    sym: bool = False
    grid: str = "minmax"
    calib: str = "synthvqa"  # synthvqa, synthvqa:caption, a ShareGPT4V .json/.jsonl, or a .txt file
    image_root: str | None = None
    calib_n: int = 32  # the default grid on the testbed must fit 10 minutes on 2 cores; raise it for real checkpoints
    seq_len: int = 512
    seed: int = 1  # a positive integer (the synthvqa generator refuses 0)
    seeds: list[int] | None = None  # run the grid once per calibration seed (the spread across calibration sets); replaces seed
    batch_size: int = 4
    tasks: list[str] | None = None  # None = the model's default tasks (synthvqa tasks for the testbed)
    eval_n: int | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-method options
    device: str = "auto"
    dtype: str = "auto"
    runs: str = "runs"
    name: str | None = None
    quantize_vision: bool = False
    max_blocks: int | None = None  # quantize only the first N decoder blocks (cost runs on huge models; the cell says so)
    save_model: bool = True
    force: bool = False
    latency: bool = True  # measure prefill/decode/memory of the deployed model per cell
    kernel: str = "auto"  # auto, int4pack, int8pack, dequant or fake (ptqbench.deploy.kernels)
    infer_dtype: str = "bfloat16"  # the dtype the latency deployment runs in (bf16: the only one with fast CPU kernels)
    latency_tokens: int = 8
    latency_batch: int = 1
    executor: str = "local"  # local, or ray (pip install ptqbench[ray])
    address: str | None = None  # Ray cluster address (default: start a local Ray instance)
    allow_pickle: bool = False  # load a checkpoint's pickled .bin weights (they can run code: refused by default)

    def __post_init__(self):
        self.validate()

    def validate(self) -> "RunConfig":
        hints = get_type_hints(RunConfig)
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        from ptqbench.methods import all_methods

        known = all_methods()
        if self.methods is not None and not self.methods:
            raise BadInput("methods is empty; accepted: one or more of " + ", ".join(sorted(known)) + " (or leave it unset: all)")
        for m in self.methods or []:
            if m not in known:
                raise one_of("method", m, sorted(known))
        if len(set(self.method_list())) != len(self.method_list()):
            raise BadInput(f"methods {','.join(self.method_list())!r} name a method twice; accepted: each method once")
        if len(set(self.bits)) != len(self.bits):
            raise BadInput(f"bits {','.join(map(str, self.bits))!r} name a width twice; accepted: each of 2..8 once")
        for b in self.bits:
            if not 2 <= b <= 8:
                raise one_of("bits", b, range(2, 9))
        if not self.bits:
            raise BadInput("bits is empty; accepted: one or more of 2..8")
        if self.group_size is not None:
            QuantSpec(bits=self.bits[0], group_size=self.group_size)
        if self.grid not in GRIDS:
            raise one_of("grid", self.grid, GRIDS)
        for key, low in (("calib_n", 1), ("seq_len", 8), ("batch_size", 1), ("seed", 1)):
            if getattr(self, key) < low:
                raise BadInput(f"{key.replace('_', '-')} {getattr(self, key)!r} is not accepted; accepted: an integer >= {low}")
        if self.seeds is not None:
            if not self.seeds or any(v < 1 for v in self.seeds) or len(set(self.seeds)) != len(self.seeds):
                raise BadInput(f"seeds {','.join(map(str, self.seeds))!r} is not accepted; accepted: distinct integers >= 1, "
                               "e.g. 1,2,3")
        if self.max_blocks is not None and self.max_blocks < 1:
            raise BadInput(f"max-blocks {self.max_blocks!r} is not accepted; accepted: a positive integer (or unset: every block)")
        if self.eval_n is not None and self.eval_n < 1:
            raise BadInput(f"eval-n {self.eval_n!r} is not accepted; accepted: a positive integer")
        if self.device not in DEVICES:
            raise one_of("device", self.device, DEVICES)
        from ptqbench.deploy.kernels import CHOICES as KERNEL_CHOICES

        if self.kernel not in KERNEL_CHOICES:
            raise one_of("kernel", self.kernel, KERNEL_CHOICES)
        if self.infer_dtype not in DTYPES[1:]:
            raise one_of("infer-dtype", self.infer_dtype, DTYPES[1:])
        for key in ("latency_tokens", "latency_batch"):
            if getattr(self, key) < (2 if key == "latency_tokens" else 1):
                raise BadInput(f"{key.replace('_', '-')} {getattr(self, key)!r} is not accepted; accepted: an integer >= {2 if key == 'latency_tokens' else 1}")
        if self.executor not in ("local", "ray"):
            raise one_of("executor", self.executor, ("local", "ray"))
        if self.address is not None and self.executor != "ray":
            raise BadInput(f"address {self.address!r} is only used by the ray executor; accepted: --executor ray with --address, or no --address")
        if self.dtype not in DTYPES:
            raise one_of("dtype", self.dtype, DTYPES)
        for m, opts in self.options.items():
            if m not in known:
                raise one_of("method in options", m, sorted(known))
            if m not in self.method_list():
                raise BadInput(f"options for method {m!r}, which is not in the grid, would be ignored; accepted: options of "
                               + ", ".join(self.method_list()))
            if not isinstance(opts, dict):
                raise BadInput(f"options for {m!r} must be a mapping of option -> value")
        return self

    def method_list(self) -> list[str]:
        from ptqbench.methods import all_methods

        return list(self.methods) if self.methods is not None else list(all_methods())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)



def _check_type(name: str, value, tp) -> None:
    """Minimal runtime check of the annotated type, so a YAML typo fails on load with one line."""
    flag = name.replace("_", "-")
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
            _check_type(name, v, args[0])
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


def load_config(path: str | Path | None, overrides: dict[str, Any]) -> RunConfig:
    """YAML fields (dashes or underscores) overlaid by CLI flags that were given."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise BadInput(f"config file {str(p)!r} does not exist; accepted: a YAML file with RunConfig fields")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise BadInput(f"config file {str(p)!r} is not valid YAML ({str(e).splitlines()[0]}); accepted: a YAML mapping of RunConfig fields") from None
        if not isinstance(loaded, dict):
            raise BadInput(f"config file {str(p)!r} holds no mapping of fields; accepted: a YAML mapping of RunConfig fields")
        data = {k.replace("-", "_"): v for k, v in loaded.items()}
    accepted = [f.name for f in dataclasses.fields(RunConfig)]
    for k in data:
        if k not in accepted:
            raise BadInput(f"config key {k!r} does not exist; accepted: {', '.join(a.replace('_', '-') for a in accepted)}")
    for k in ("methods", "bits", "tasks", "seeds"):  # YAML may give "gptq,vlmq" like the flag does
        if isinstance(data.get(k), str):
            data[k] = parse_list(data[k], int if k in ("bits", "seeds") else str, k)
        elif isinstance(data.get(k), int) and k in ("bits", "seeds"):
            data[k] = [data[k]]
    options = overrides.pop("options", None) or {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    if options:  # flags extend the YAML's per-method options rather than replace them
        merged = {m: dict(o) for m, o in (data.get("options") or {}).items()} if isinstance(data.get("options"), dict) else {}
        for m, o in options.items():
            merged.setdefault(m, {}).update(o)
        data["options"] = merged
    return RunConfig(**data)


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
