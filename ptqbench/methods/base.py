"""The contract between the engine and every PTQ method, built-in or plugin.

Lifecycle (driven by the engine, which never knows a method by name):

    m = MethodClass(spec, **options)      # options validated against MethodClass.Options
    m.on_start(run)                       # once, before block 0 (e.g. MBQ's whole-model gradient pass)
    for every block:                      # block by block, two activation streams kept by the engine
        m.quantize_block(block)           # read inputs, own statistics, commit a QuantizedWeight per linear
                                          # (a generator may hand work to the engine: `Together`)
        m.comparable_output(block, name, y)   # per-linear diagnostics (identity unless outputs were rescaled)
    info = m.on_end(run)                  # method-level facts stored with the result

A method sees a block through a `BlockView` and the run through a `RunView` (both defined here and
implemented by the engine), reads a decoder block's parts by role through its `BlockLayout`, and keeps
its own statistics in accumulators such as `Hessian` and `CrossTerm`. Methods never load models or data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, NamedTuple

import torch
from torch import nn

from ptqbench.errors import BadInput
from ptqbench.methods.quant import QuantizedWeight, QuantSpec

Stream = Literal["fp", "quant"]


# ---- block layout ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockLayout:
    """Where a pre-norm decoder block keeps its parts, by role: module paths relative to the block.

    Model adapters declare one per family; methods that need a block's structure (AWQ/MBQ scale groups,
    VLMQ's attention sub-block) read the roles instead of module names."""

    attn_norm: str  # norm whose output feeds q, k, v
    attn: str  # attention module, called as attn(hidden_states=..., **layer kwargs)
    q: str
    k: str
    v: str
    o: str
    mlp_norm: str  # norm whose output feeds gate and up
    mlp: str  # MLP module, called as mlp(x)
    gate: str
    up: str
    down: str

    @property
    def attention_projections(self) -> tuple[str, str, str, str]:
        return (self.q, self.k, self.v, self.o)

    @property
    def sequential(self) -> tuple[tuple[str, ...], ...]:
        """True-sequential groups in execution order: q,k,v -> o -> gate,up -> down."""
        return ((self.q, self.k, self.v), (self.o,), (self.gate, self.up), (self.down,))

    def attention_residual(self, block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Attn(X) = X + attn(attn_norm(X)): the attention sub-block with its residual."""
        attn = block.get_submodule(self.attn)
        out = attn(hidden_states=block.get_submodule(self.attn_norm)(hidden), **kwargs)
        return hidden + (out[0] if isinstance(out, tuple) else out)


def require_layout(layout: BlockLayout | None, method: str) -> BlockLayout:
    if layout is None:
        raise RuntimeError(f"method {method!r} needs a decoder block layout (roles -> module names); this block has none")
    return layout


# ---- what a method sees ---------------------------------------------------------------------------
class BlockView:
    """One block being quantized, as a method sees it (implemented by the engine).

    Attributes: `index` (position in its stack), `prefix` (the block's module path), `block` (the
    module being quantized, on the compute device; methods may fold scales into it), `fp_block` (a
    frozen full-precision copy), `linear_names` (the linears to commit), `groups` (their true-sequential
    groups, each sharing one input), `layout` (roles -> names; None for vision-tower blocks), `device`
    and `dtype`. The streams: "fp" is the full-precision input of the block, "quant" the input produced
    by the already quantized blocks before it."""

    index: int
    prefix: str
    block: nn.Module
    fp_block: nn.Module
    linear_names: list[str]
    groups: list[list[str]]
    layout: BlockLayout | None
    device: torch.device
    dtype: torch.dtype

    @property
    def n_batches(self) -> int:
        raise NotImplementedError

    def module(self, name: str) -> nn.Linear:
        return self.block.get_submodule(name)

    def weight(self, name: str) -> torch.Tensor:
        return self.module(name).weight.data

    def masks(self, b: int) -> dict[str, torch.Tensor]:
        """Per-token bool masks (B, T) of batch b: valid / vision / text / answer / reply."""
        raise NotImplementedError

    def kwargs(self, b: int, dtype: torch.dtype | None = None) -> dict:
        """The block's call kwargs for batch b (on the device, in the block's dtype, then in `dtype`)."""
        raise NotImplementedError

    def stream(self, which: Stream, b: int) -> torch.Tensor:
        """Block input (B, T, d) of batch b on one stream."""
        raise NotImplementedError

    def run(self, module: nn.Module, x: torch.Tensor, b: int) -> torch.Tensor:
        """Output of a whole block (`block`, `fp_block` or a copy) on input x with batch b's kwargs."""
        raise NotImplementedError

    def linear_inputs(self, names: list[str], b: int, stream: Stream) -> dict[str, torch.Tensor]:
        """Inputs (B, T, d) of the named linears for batch b: on the "quant" stream through the partly
        quantized `block`, on the "fp" stream through `fp_block`."""
        raise NotImplementedError

    def commit(self, name: str, qw: QuantizedWeight) -> None:
        """Put the quantized weight into the block (every linear must be committed exactly once)."""
        raise NotImplementedError

    def memo(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """`compute()`, a value of this block's full-precision copy, its FP inputs and what `key` names alone
        (e.g. a search candidate's outputs for one format), which the engine may share with the other cells
        of a lockstep pass that ask for the same key. `key` must name everything else it depends on. The
        value is shared: read it, never change it."""
        return compute()


class RunBatch(NamedTuple):
    hidden: torch.Tensor  # (B, T, d) input of decoder layer 0
    kwargs: dict  # decoder-layer call kwargs
    extras: dict  # what the family needs between layers
    masks: dict[str, torch.Tensor]
    input_ids: torch.Tensor


class RunView:
    """The whole run, as `on_start`/`on_end` see it (implemented by the engine): the decoder, its head,
    the calibration batches and the compute device. Modules stay where they are stored; a method that
    runs them moves them to `device` and back."""

    device: torch.device
    layout: BlockLayout | None  # the decoder blocks' layout
    n_samples: int
    n_batches: int

    def decoder_layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def batch(self, b: int) -> RunBatch:
        """Calibration batch b on the compute device (floating tensors in the model's dtype)."""
        raise NotImplementedError

    def batch_masks(self, b: int) -> dict[str, torch.Tensor]:
        """Masks of calibration batch b where they are stored (cheap checks)."""
        raise NotImplementedError

    def decoder_step(self, i: int, layer: nn.Module, hidden: torch.Tensor, batch: RunBatch) -> torch.Tensor:
        """Decoder layer i on `hidden`, including whatever the family does between layers."""
        raise NotImplementedError

    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    def lm_head(self) -> nn.Module:
        raise NotImplementedError

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head()(self.final_norm()(hidden))

    def memo(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """`compute()`, a statistic of the full-precision model and the calibration set alone (call it from
        `on_start`, before any block is quantized), computed once per grid when the engine shares it across
        cells (the lockstep schedule). `key` names everything besides those two that it depends on. The
        value is shared: read it, never change it."""
        return compute()


# ---- work the engine may run together across cells --------------------------------------------------
class Together:
    """A piece of a method's block work that the engine may run together with like pieces of other cells of a
    lockstep pass, which saves per-call overhead where the pieces are small (GPTQ's column loop, `gptq.Solve`).
    `quantize_block` may be a generator: it yields a list of pieces and receives their results, in order (a
    piece that failed is thrown into it as its exception). Pieces with equal `(type, key())` run in one
    `run_together` call, which must give every piece, bit for bit, what it gives that piece alone."""

    def key(self) -> tuple:
        raise NotImplementedError

    def nbytes(self) -> int:
        """Memory the piece holds while it waits and adds when it runs (the engine bounds the sum over what waits)."""
        return 0

    @classmethod
    def run_together(cls, items: list) -> list:
        """A result per item, in order, or the exception that item raised."""
        raise NotImplementedError


# ---- statistics accumulators ------------------------------------------------------------------------
class Hessian:
    """H = 2/N sum_t w_t x_t x_t^T over the masked tokens, accumulated in fp32 (w_t = 1 by default)."""

    def __init__(self):
        self.sum: torch.Tensor | None = None
        self.n_tokens = 0

    def add_batch(self, x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """x: (B, T, d) inputs, mask: (B, T) bool, weight: (B, T) per-token weights or None."""
        x = x[mask].float()
        xw = x if weight is None else x * weight[mask].float()[:, None]
        if self.sum is None:
            self.sum = torch.zeros(x.shape[-1], x.shape[-1], device=x.device)
        self.sum += xw.T @ x
        self.n_tokens += int(mask.sum())

    def value(self) -> torch.Tensor:
        """The statistic; call it once, after the last batch (it scales the sum in place)."""
        self.sum *= 2.0 / max(self.n_tokens, 1)
        return self.sum


class CrossTerm:
    """GPTAQ's cross statistic dXXT = 2/N sum_t w_t (x_fp - x)_t x_t^T over the masked tokens (fp32), x
    the input on the quantized path and x_fp the full-precision one."""

    def __init__(self):
        self.sum: torch.Tensor | None = None
        self.n_tokens = 0

    def add_batch(self, x: torch.Tensor, x_fp: torch.Tensor, mask: torch.Tensor,
                  weight: torch.Tensor | None = None) -> None:
        x = x[mask].float()
        dx = x_fp[mask].float() - x
        dxw = dx if weight is None else dx * weight[mask].float()[:, None]
        if self.sum is None:
            self.sum = torch.zeros(x.shape[-1], x.shape[-1], device=x.device)
        self.sum += dxw.T @ x
        self.n_tokens += int(mask.sum())

    def value(self) -> torch.Tensor:
        """The statistic; call it once, after the last batch (it scales the sum in place)."""
        self.sum *= 2.0 / max(self.n_tokens, 1)
        return self.sum


# ---- the method interface --------------------------------------------------------------------------
@dataclass
class NoOptions:
    pass


def option(default, help: str, choices: tuple | None = None, low: float | None = None, high: float | None = None):
    """A method option: a dataclass field with a help text (shown by `bench methods`), checked by
    `parse_options` against its choices or its range [low, high]."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "low": low, "high": high})


class Method:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    # The method's data flow, shown by `bench methods`: which stream feeds its statistics ("fp": AWQ/MBQ,
    # "quant": GPTQ, "both": GPTAQ/VLMQ, "none": RTN). The engine keeps both streams for every method.
    streams: ClassVar[str] = "quant"
    # Whether the method can quantize vision-tower blocks (it needs no decoder block layout).
    supports_vision: ClassVar[bool] = True
    # Whether on_start runs the whole decoder (MBQ's gradient pass): not possible on lazily built models.
    needs_whole_model: ClassVar[bool] = False

    def __init__(self, spec: QuantSpec, **options: Any):
        self.spec = spec
        self.opts = parse_options(self.Options, options, self.name)

    def on_start(self, run: RunView) -> None:
        pass

    def quantize_block(self, block: BlockView) -> None:
        raise NotImplementedError

    def comparable_output(self, block: BlockView, name: str, y: torch.Tensor) -> torch.Tensor:
        """Linear `name`'s output in the quantized block, brought to the scale of the FP block's for the
        per-linear diagnostics. Identity unless the method folded a scale into the linear's outputs."""
        return y

    def on_end(self, run: RunView) -> dict:
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
                options[key] = value = float(value)
            low, high = f.metadata.get("low"), f.metadata.get("high")
            if (low is not None and value < low) or (high is not None and value > high):
                accepted = f"{low} to {high}" if low is not None and high is not None else (
                    f">= {low}" if low is not None else f"<= {high}")
                raise BadInput(f"option {key}={value!r} of method {method!r} is not accepted; accepted: {accepted}")
    return cls(**options)


def option_rows(cls: type) -> list[tuple[str, Any, str]]:
    return [(f.name, f.default, f.metadata.get("help", "")) for f in dataclasses.fields(cls)]
