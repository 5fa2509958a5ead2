"""The `Method` interface every PTQ method implements, built-in or plugin.

Lifecycle (driven by the engine, which never knows a method by name):

    m = MethodClass(spec, **options)      # options validated against MethodClass.Options
    m.on_start(run)                       # once, before block 0 (e.g. MBQ's whole-model gradient pass)
    for every block:                      # block by block, two activation streams kept by the engine
        m.quantize_block(block)           # ask `block` for statistics, commit a QuantizedWeight per linear
    info = m.on_end(run)                  # method-level facts stored with the result

What a block context offers (see `ptqbench.engine.blockwise.BlockContext`): the block and a frozen
full-precision copy, the linears to quantize and their true-sequential groups, the full-precision and
quantized input streams with their per-token masks (valid / vision / text / answer / reply) and replay kwargs,
`input_stats(...)` for masked fp32 Hessians (and GPTAQ's cross term, optionally token-weighted),
`capture_inputs(...)`, and `commit(name, quantized_weight)`.

Methods never load models or data: everything arrives through these contexts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from ptqbench.errors import BadInput
from ptqbench.methods.quant import QuantSpec


@dataclasses.dataclass
class NoOptions:
    pass


def option(default, help: str, choices: tuple | None = None):
    """A method option: a dataclass field with a help text (shown by `bench methods`)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


class Method:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    # Which streams feed this method's statistics: "fp" (AWQ/MBQ), "quant" (GPTQ), "both" (GPTAQ/VLMQ).
    streams: ClassVar[str] = "quant"
    # Whether the method can quantize vision-tower blocks (it needs no Llama-style block structure).
    supports_vision: ClassVar[bool] = True
    # Whether on_start runs the whole decoder (MBQ's gradient pass): not possible on lazily built models.
    needs_whole_model: ClassVar[bool] = False

    def __init__(self, spec: QuantSpec, **options: Any):
        self.spec = spec
        self.opts = parse_options(self.Options, options, self.name)

    def on_start(self, run) -> None:
        pass

    def quantize_block(self, block) -> None:
        raise NotImplementedError

    def on_end(self, run) -> dict:
        return {}

    def options_dict(self) -> dict:
        return dataclasses.asdict(self.opts)


def parse_options(cls: type, options: dict, method: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in options.items():
        if key not in fields:
            raise BadInput(f"option {key!r} is not accepted by method {method!r}; accepted: {', '.join(fields) or 'none'}")
        f = fields[key]
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise BadInput(f"option {key}={value!r} is not accepted by method {method!r}; accepted: {', '.join(map(str, choices))}")
        default = f.default
        if isinstance(default, bool) and not isinstance(value, bool):
            raise BadInput(f"option {key}={value!r} of method {method!r} is not accepted; accepted: true or false")
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise BadInput(f"option {key}={value!r} of method {method!r} is not accepted; accepted: a number")
            if isinstance(default, float):
                options[key] = float(value)
    return cls(**options)


def option_rows(cls: type) -> list[tuple[str, Any, str]]:
    return [(f.name, f.default, f.metadata.get("help", "")) for f in dataclasses.fields(cls)]
