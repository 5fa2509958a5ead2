"""Block-by-block quantization engine.

For every decoder block, in order:
  1. the block moves to the compute device and a frozen full-precision copy is made;
  2. the method quantizes it through a `BlockContext` (inputs on request, one `commit` per linear); work it
     hands to the engine (`Together`, e.g. GPTQ's solves) runs together with the like work of the pass's
     other cells;
  3. diagnostics: each linear's and the block's output error on the full-precision stream, split by
     token type (vision / text / answer);
  4. both streams advance: fp <- FP block(fp), quant <- quantized block(quant); the block returns to
     storage.

Two streams are kept for every method: GPTQ-style methods read quantized-stream inputs, AWQ/MBQ
full-precision ones, GPTAQ/VLMQ both. In a weight-activation format (spec.act_bits < 16) the quantized
block runs as deployed: the activation quantizer sits at the input of each of its linears while the block
is quantized, measured and advanced, so quantized-stream statistics see quantized inputs; the
full-precision copy never has it. The engine knows no method by name and holds no method's
statistics: methods read inputs through the views of `ptqbench.methods.base` and keep their own.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from ptqbench.engine.calibration import CalibSet
from ptqbench.errors import BadInput
from ptqbench.methods.base import BlockView, Method, RunBatch, RunView
from ptqbench.methods.quant import (QuantizedWeight, install_activation_quantizers, install_format_quantizers,
                                   install_static_activation_quantizers, static_act_scale)
from ptqbench.models.adapters import Adapter, adapter_for, move
from ptqbench.models.lazy import block_seed, is_lazy, materialize_block

TOKEN_TYPES = ("vision", "text", "answer")


class _Stop(Exception):
    pass


class RunContext(RunView):
    """What `Method.on_start/on_end` see: the decoder through its adapter, and the calibration set; `memo`
    shares whole-run statistics across the cells of a lockstep grid."""

    def __init__(self, model: nn.Module, adapter: Adapter, calib: CalibSet, device: torch.device,
                 memo: dict | None = None):
        self.model, self._adapter, self._calib, self.device = model, adapter, calib, device
        self._memo = memo  # shared by the cells of a lockstep grid; None: nothing is shared
        self.layout = adapter.decoder_layout
        self.n_samples = len(calib)
        self.n_batches = len(calib.batches)

    def decoder_layers(self) -> nn.ModuleList:
        return self._adapter.decoder_layers()

    def memo(self, key: tuple, compute):
        if self._memo is None:
            return compute()
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def batch(self, b: int) -> RunBatch:
        cb = self._calib.batches[b]
        dtype = next(self.model.parameters()).dtype
        return RunBatch(cb.hidden.to(self.device, dtype), move(cb.kwargs, self.device, dtype),
                        move(cb.extras, self.device, dtype), move(cb.masks, self.device), cb.input_ids.to(self.device))

    def batch_masks(self, b: int) -> dict[str, torch.Tensor]:
        return self._calib.batches[b].masks

    def decoder_step(self, i: int, layer: nn.Module, hidden: torch.Tensor, batch: RunBatch) -> torch.Tensor:
        return self._adapter.after_layer(i, self._adapter.run_layer(layer, hidden, batch.kwargs), batch.extras)

    def final_norm(self) -> nn.Module:
        return self._adapter.final_norm()

    def lm_head(self) -> nn.Module:
        return self._adapter.lm_head()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._adapter.logits(hidden)


def capture_linear_inputs(ctx: "BlockContext", module: nn.Module, names: list[str], b: int, stream: str) -> dict[str, torch.Tensor]:
    """Inputs of the named linears of `module` on batch b of a stream; the forward stops once all are seen."""
    got: dict[str, torch.Tensor] = {}
    hooks = []
    for n in names:
        def hook(mod, args, n=n):
            got[n] = args[0].detach()
            if len(got) == len(names):
                raise _Stop
        hooks.append(module.get_submodule(n).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            ctx.run(module, ctx.stream(stream, b), b)
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    return got


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


class SharedBlock:
    """What every cell of a lockstep pass shares for one block: the frozen full-precision copy, the FP
    stream into it, and what depends on those two alone, computed once however many cells quantize the
    block: the FP linear inputs methods ask for, the FP block's per-linear and whole outputs, and the
    next FP stream. With one cell (`cache` False) nothing is kept beyond the call that needs it, so the
    cells schedule holds no more memory than it always did. Every value is the same either way."""

    def __init__(self, fp_block: nn.Module, fp_in: list[torch.Tensor], cache: bool = False, memo_bytes: int = 0):
        self.fp_block, self.fp_in, self.cache = fp_block, fp_in, cache
        self.memo_bytes = memo_bytes  # the most the methods' memo (`BlockView.memo`) may hold; oldest out first
        self._memo: OrderedDict = OrderedDict()
        self._inputs: dict[tuple[str, int], torch.Tensor] = {}
        self._outputs: dict[int, tuple] = {}
        self._next: dict[int, torch.Tensor] = {}  # the next FP stream, always kept (as the stream itself is)
        self._ref_sums: dict[int, dict] = {}  # per batch: the diagnostics' FP denominators (a few floats)
        self.seconds = 0.0  # spent computing shared values (split among the pass's cells)

    def memo(self, key: tuple, compute):
        if not self.cache:
            return compute()
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key][0]
        t0 = time.perf_counter()
        value = compute()
        self.seconds += time.perf_counter() - t0
        size = _nbytes(value)
        if size <= self.memo_bytes:
            self._memo[key] = (value, size)
            while sum(v[1] for v in self._memo.values()) > self.memo_bytes:
                self._memo.popitem(last=False)
        return value

    def linear_inputs(self, ctx: "BlockContext", names: list[str], b: int) -> dict[str, torch.Tensor]:
        if not self.cache:
            return capture_linear_inputs(ctx, self.fp_block, names, b, "fp")
        missing = [n for n in names if (n, b) not in self._inputs]
        if missing:
            t0 = time.perf_counter()
            for n, x in capture_linear_inputs(ctx, self.fp_block, missing, b, "fp").items():
                self._inputs[(n, b)] = x
            self.seconds += time.perf_counter() - t0
        return {n: self._inputs[(n, b)] for n in names}

    @torch.no_grad()
    def outputs(self, ctx: "BlockContext", b: int, after, extras: dict) -> tuple:
        """(block output, {linear: its output}, the next FP stream's batch b) of the FP block on batch b."""
        if b in self._outputs:
            out, ys, nxt = self._outputs[b]
            return out.to(ctx.device), {n: y.to(ctx.device) for n, y in ys.items()}, nxt
        t0 = time.perf_counter()
        ys: dict[str, torch.Tensor] = {}
        hooks = [self.fp_block.get_submodule(n).register_forward_hook(lambda m, a, y, n=n: ys.__setitem__(n, y))
                 for n in ctx.linear_names]
        try:
            out = ctx.run(self.fp_block, ctx.stream("fp", b), b)
        finally:
            for h in hooks:
                h.remove()
        nxt = self._next[b] = after(ctx.index, out, extras).to(self.fp_in[b].device)
        if self.cache:  # kept beside the streams (CPU), not on the compute device
            home = self.fp_in[b].device
            self._outputs[b] = (out.to(home), {n: y.to(home) for n, y in ys.items()}, nxt)
        self.seconds += time.perf_counter() - t0
        return out, ys, nxt

    def ref_sums(self, b: int, ys: dict, out: torch.Tensor, nxt: torch.Tensor, tokens: dict) -> dict[str, list[float]]:
        """The FP side of the diagnostics' ratios on batch b, per linear and for the block and stream errors:
        sum ||y_fp||^2 per token type (`_ref_sums`), the same for every cell of the pass."""
        if b in self._ref_sums:
            return self._ref_sums[b]
        t0 = time.perf_counter()
        sums = {n: _ref_sums(y, tokens) for n, y in ys.items()}
        sums.update(block_on_fp_input=_ref_sums(out, tokens), stream=_ref_sums(nxt, tokens))
        if self.cache:
            self._ref_sums[b] = sums
        self.seconds += time.perf_counter() - t0
        return sums

    def next_stream(self, ctx: "BlockContext", after, extras_of) -> list[torch.Tensor]:
        """The FP stream after this block (computed here for batches no cell's measurement reached)."""
        return [self._next[b] if b in self._next else self.outputs(ctx, b, after, extras_of(b))[2]
                for b in range(len(self.fp_in))]


class BlockContext(BlockView):
    """One block of a stack, as the method sees it (see `BlockView`). `batches` hold the per-batch
    kwargs/masks: the calibration set's for decoder blocks, the vision captures for vision-tower blocks
    (`is_vision`: every token is a valid vision token, no answer tokens, no layout)."""

    def __init__(self, index: int, prefix: str, block: nn.Module, fp_block: nn.Module, names: list[str],
                 groups: list[list[str]], fp_in: list[torch.Tensor], q_in: list[torch.Tensor], batches: list,
                 adapter: Adapter, device: torch.device, is_vision: bool = False, shared: "SharedBlock | None" = None):
        self.index, self.prefix, self.block, self.fp_block = index, prefix, block, fp_block
        self.shared = shared if shared is not None else SharedBlock(fp_block, fp_in)
        self.linear_names, self.groups = names, groups
        self.layout = None if is_vision else adapter.decoder_layout
        self.batches, self.is_vision = batches, is_vision
        self.fp_in, self.q_in, self._adapter, self.device = fp_in, q_in, adapter, device
        self.dtype = next(block.parameters()).dtype
        self.committed: dict[str, QuantizedWeight] = {}

    @property
    def n_batches(self) -> int:
        return len(self.fp_in)

    def kwargs(self, b: int, dtype: torch.dtype | None = None) -> dict:
        kw = self.batches[b].kwargs
        if "vision_calls" in kw:  # vision blocks: each block has its own captured call arguments
            kw = move(kw["vision_calls"][self.index][1], self.device, self.dtype)
        else:
            kw = move(kw, self.device, self.dtype)
        return kw if dtype is None else move(kw, self.device, dtype)

    def masks(self, b: int) -> dict[str, torch.Tensor]:
        return move(self.batches[b].masks, self.device)

    def stream(self, which: str, b: int) -> torch.Tensor:
        src = {"fp": self.fp_in, "quant": self.q_in}[which]
        return src[b].to(self.device, self.dtype)

    def run(self, module: nn.Module, x: torch.Tensor, b: int) -> torch.Tensor:
        kw = self.batches[b].kwargs
        if "vision_calls" in kw:
            args, kwargs = move(kw["vision_calls"][self.index], self.device, self.dtype)
            out = module(x, *args, **kwargs)
            return out[0] if isinstance(out, tuple) else out
        return self._adapter.run_layer(module, x, self.kwargs(b))

    def linear_inputs(self, names: list[str], b: int, stream: str) -> dict[str, torch.Tensor]:
        """Inputs of the named linears; the forward stops as soon as all are seen. Full-precision ones come
        from the block's `SharedBlock` (computed once for every cell of a lockstep pass: read-only)."""
        if stream == "fp":
            return self.shared.linear_inputs(self, names, b)
        return capture_linear_inputs(self, self.block, names, b, "quant")

    def memo(self, key: tuple, compute):
        return self.shared.memo(key, compute)

    def commit(self, name: str, qw: QuantizedWeight) -> None:
        lin = self.module(name)
        if tuple(qw.qweight.shape) != tuple(lin.weight.shape):
            raise ValueError(f"{name}: quantized shape {tuple(qw.qweight.shape)} != weight {tuple(lin.weight.shape)}")
        lin.weight.data = qw.dequantize().to(lin.weight.device, lin.weight.dtype)
        self.committed[name] = qw


@dataclass
class EngineResult:
    quantized: dict[str, QuantizedWeight]  # fully qualified linear name -> weight
    diagnostics: dict  # per-linear and per-block errors split by token type
    method_info: dict


def _token_sets(masks: dict) -> dict[str, tuple[torch.Tensor, int]]:
    """Per token type (and "all" valid tokens), the flat indices of its tokens and their number: selecting by
    index gives the same elements in the same order as the boolean mask, without finding them again per call."""
    out = {}
    for t in ("all",) + TOKEN_TYPES:
        idx = masks["valid" if t == "all" else t].reshape(-1).nonzero().squeeze(1)
        out[t] = (idx, int(idx.numel()))
    return out


def _ref_sums(ref: torch.Tensor, tokens: dict) -> list[float]:
    """sum ||y_fp||^2 over each token type's tokens (the denominators of `_err_final`)."""
    r = ref.float().pow(2).sum(-1).reshape(-1)
    return [float(r[tokens[t][0]].sum()) for t in ("all",) + TOKEN_TYPES]


def _err_update(acc: dict, key: str, y: torch.Tensor, ref: torch.Tensor, tokens: dict, ref_sums: list[float]) -> None:
    d = (y.float() - ref.float()).pow(2).sum(-1).reshape(-1)
    e = acc.setdefault(key, {t: [0.0, 0.0, 0] for t in ("all",) + TOKEN_TYPES})
    for t, r in zip(("all",) + TOKEN_TYPES, ref_sums):
        idx, n = tokens[t]
        e[t][0] += float(d[idx].sum())
        e[t][1] += r
        e[t][2] += n


def _err_final(acc: dict) -> dict:
    """Relative squared error sum||y - y_fp||^2 / sum||y_fp||^2 per token type (None when no tokens)."""
    return {k: {t: (v[0] / v[1] if v[2] and v[1] > 0 else None) for t, v in e.items()} for k, e in acc.items()}


@dataclass
class _Stack:
    """One stack of blocks and what quantizing it needs: the decoder, or the vision tower first."""

    layers: nn.ModuleList
    prefix: str
    batches: list  # per batch: the stack's FP input (`hidden`) with its kwargs/masks/extras
    is_vision: bool
    n_blocks: int


@dataclass
class Job:
    """One cell's quantization in a pass: its own copy of the model and its own method instance. The engine
    fills in the rest; a job whose method raises is dropped from the pass with its `error`, the others go on."""

    model: nn.Module
    method: Method
    adapter: Adapter | None = None
    quantized: dict = field(default_factory=dict)
    diag: dict = field(default_factory=lambda: {"linears": {}, "blocks": {}, "vision_blocks": {}})
    info: dict | None = None
    error: BaseException | None = None
    seconds: float = 0.0  # its own work, plus an equal share of what the pass computed for all its jobs
    stacks: list = field(default_factory=list)
    run: RunContext | None = None
    q: list = field(default_factory=list)  # its quantized stream into the current block
    q_start: list | None = None  # the decoder's quantized stream input (after a quantized vision tower)
    q_is_fp: bool = False  # `q` holds the FP stream's values (before the stack's first block)

    def result(self) -> EngineResult:
        return EngineResult(self.quantized, self.diag, self.info or {})


def _load_block(stack: _Stack, i: int, adapter: Adapter, device: torch.device) -> tuple[nn.Module, torch.device]:
    """Block i on the compute device, and where it is stored. A random-weight block on meta is
    materialized on the device and kept on the CPU afterwards."""
    layer = stack.layers[i]
    if is_lazy(layer):
        return materialize_block(layer, adapter.model, device, block_seed(adapter.model, i)), torch.device("cpu")
    storage = next(layer.parameters()).device
    return layer.to(device), storage


def _job_block(stack: _Stack, i: int, device: torch.device, fp_block: nn.Module,
               grad_flags: list[bool]) -> tuple[nn.Module, torch.device]:
    """Block i of a job after the pass's first: its own (still full-precision) layer moved to the device,
    or for a lazily built model a copy of the block the pass materialized (the same values: one seed)."""
    layer = stack.layers[i]
    if is_lazy(layer):
        block = copy.deepcopy(fp_block)
        for p, flag in zip(block.parameters(), grad_flags):
            p.requires_grad_(flag)
        return block, torch.device("cpu")
    storage = next(layer.parameters()).device
    return layer.to(device), storage


@torch.no_grad()
def _measure_and_advance(ctx: BlockContext, method: Method, stack: _Stack, adapter: Adapter, dtype: torch.dtype,
                         q: list[torch.Tensor], q_is_fp: bool = False) -> tuple[list, dict, dict]:
    """Per-linear and block errors on the FP stream, then the job's quantized stream through its block
    (the FP side comes from the pass's `SharedBlock`; `q_is_fp`: the quantized stream still holds the FP
    stream's values, so the block's output on it is the one just computed). Returns the next quantized stream
    and the two error accumulators."""
    block, names, i = ctx.block, ctx.linear_names, ctx.index
    after = _after(stack, adapter)
    lin_acc: dict = {}
    blk_acc: dict = {}
    new_q = []
    for b in range(len(q)):
        tokens = _token_sets(ctx.masks(b))
        extras = move(stack.batches[b].extras, ctx.device, dtype)
        out_fp, ys_fp, next_fp = ctx.shared.outputs(ctx, b, after, extras)
        ys_q = {}
        hooks = [block.get_submodule(n).register_forward_hook(lambda m, a, y, n=n: ys_q.__setitem__(n, y)) for n in names]
        out_qfp = ctx.run(block, ctx.stream("fp", b), b)
        for h in hooks:
            h.remove()
        refs = ctx.shared.ref_sums(b, ys_fp, out_fp, next_fp.to(out_fp.device), tokens)
        for n in names:
            _err_update(lin_acc, n, method.comparable_output(ctx, n, ys_q[n]), ys_fp[n], tokens, refs[n])
        _err_update(blk_acc, "block_on_fp_input", out_qfp, out_fp, tokens, refs["block_on_fp_input"])
        out_q = after(i, out_qfp if q_is_fp else ctx.run(block, ctx.stream("quant", b), b), extras)
        _err_update(blk_acc, "stream", out_q, next_fp.to(out_q.device), tokens, refs["stream"])
        new_q.append(out_q.to(q[b].device))
    return new_q, lin_acc, blk_acc


def _after(stack: _Stack, adapter: Adapter):
    return (lambda i, h, e: h) if stack.is_vision else adapter.after_layer


@torch.no_grad()
def _static_act_scales(ctx: BlockContext, bits: int) -> dict[str, torch.Tensor]:
    """Per-tensor static input scales of the block's linears, calibrated on the job's quantized stream through
    the finished (quantized-weight) block with no activation quantizer: each linear's input absmax over the
    valid tokens of every batch (padding masked out), max(absmax, 1e-5) / (2^(b-1)-1) (`static_act_scale`)."""
    absmax = {n: torch.zeros((), dtype=torch.float32, device=ctx.device) for n in ctx.linear_names}
    for b in range(ctx.n_batches):
        valid = ctx.masks(b)["valid"]

        def observe(mod, args, n):
            x = args[0].detach()
            # a linear that sees a token subset (e.g. routed experts) has no per-token mask: all its rows count
            x = x[valid] if tuple(x.shape[:-1]) == tuple(valid.shape) else x.reshape(-1, x.shape[-1])
            if x.numel():
                absmax[n] = torch.maximum(absmax[n], x.float().abs().amax())
        hooks = [ctx.block.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: observe(m, a, n))
                 for n in ctx.linear_names]
        try:
            ctx.run(ctx.block, ctx.stream("quant", b), b)
        finally:
            for h in hooks:
                h.remove()
    return {n: static_act_scale(a.cpu(), bits) for n, a in absmax.items()}


def _to_static_activations(ctx: BlockContext, spec, act_hooks: list) -> list:
    """Swap the block's per-token quantizers for calibrated per-tensor static ones (the scale goes into each
    committed weight's extras["act_scale"], so it travels with the weights); returns the new hook handles."""
    for h in act_hooks:
        h.remove()
    act_hooks.clear()
    scales = _static_act_scales(ctx, spec.act_bits)
    for n, scale in scales.items():
        qw = ctx.committed[n]
        ctx.committed[n] = dataclasses.replace(qw, extras={**qw.extras, "act_scale": scale})
    return install_static_activation_quantizers([(ctx.block.get_submodule(n), s) for n, s in scales.items()],
                                                spec.act_bits)


@dataclass
class _Open:
    """A job's block while its method works on it: the method's generator (None once it is done) and the pieces
    of work it waits on (`Together`)."""

    job: Job
    k: int
    ctx: BlockContext
    act_hooks: list
    storage: torch.device
    gen: object = None
    asked: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.asked)


def _begin_job_block(job: Job, k: int, i: int, block: nn.Module, storage: torch.device, shared: SharedBlock,
                     device: torch.device) -> _Open:
    """Install the format's activation quantizers on the job's block i of stack k and start its method on it:
    a plain `quantize_block` runs to the end here; a generator runs to the first work it hands over."""
    stack, adapter, method, spec = job.stacks[k], job.adapter, job.method, job.method.spec
    names = list(adapter.block_linears(block))
    act_hooks = (install_activation_quantizers([block.get_submodule(n) for n in names], spec.act_bits)
                 if spec.quantizes_activations else [])
    ctx = BlockContext(i, f"{stack.prefix}.{i}", block, shared.fp_block, names, adapter.sequential_groups(names),
                       shared.fp_in, job.q, stack.batches, adapter, device, is_vision=stack.is_vision, shared=shared)
    state = _Open(job, k, ctx, act_hooks, storage)
    try:
        gen = method.quantize_block(ctx)
        if inspect.isgenerator(gen):
            state.gen = gen
            _step(state, None)
    except BaseException:
        _close(state)
        raise
    return state


def _step(state: _Open, results: list | None) -> None:
    """Hand the method its results (None: start it); it asks for more work or is done (gen None)."""
    try:
        failed = next((r for r in results or [] if isinstance(r, BaseException)), None)
        if failed is not None:
            state.asked = list(state.gen.throw(failed))
        else:
            state.asked = list(state.gen.send(results) if results is not None else next(state.gen))
    except StopIteration:
        state.gen, state.asked = None, []


def _run_together(states: list[_Open]) -> None:
    """One round: every piece the waiting jobs asked for, pieces of one kind and key in one `run_together`
    call (its time split evenly among them); each job then gets its results (a job that fails is recorded)."""
    groups: dict = {}
    for st in states:
        for j, piece in enumerate(st.asked):
            groups.setdefault((type(piece), piece.key()), []).append((st, j, piece))
    results = {id(st): [None] * len(st.asked) for st in states}
    for (cls, _), items in groups.items():
        t0 = time.perf_counter()
        try:
            outs = cls.run_together([piece for _, _, piece in items])
            if len(outs) != len(items):
                raise RuntimeError(f"{cls.__name__}.run_together returned {len(outs)} results for {len(items)} pieces")
        except Exception as e:  # noqa: BLE001 - every piece of the call fails with it
            outs = [e] * len(items)
        share = (time.perf_counter() - t0) / len(items)
        for (st, j, _), out in zip(items, outs):
            results[id(st)][j] = out
            st.seconds += share
    for st in states:
        t0, before = time.perf_counter(), st.ctx.shared.seconds
        try:
            _step(st, results[id(st)])
        except Exception as e:
            _close(st)
            _fail(st.job, e)
        st.seconds += (time.perf_counter() - t0) - (st.ctx.shared.seconds - before)


def _finish_job_block(state: _Open, dtype: torch.dtype) -> None:
    """After the method: check every linear was committed, calibrate static activation scales (per-tensor
    static formats: the method quantized with the per-token quantizer, which its statistics and searches saw),
    measure, advance the job's quantized stream, store the block and the committed weights."""
    job, ctx, k = state.job, state.ctx, state.k
    stack, adapter, method, spec = job.stacks[k], job.adapter, job.method, job.method.spec
    try:
        missing = [n for n in ctx.linear_names if n not in ctx.committed]
        if missing:
            raise RuntimeError(f"method {method.name!r} left linears of {ctx.prefix} unquantized: {missing}")
        if spec.static_activations:
            state.act_hooks += _to_static_activations(ctx, spec, state.act_hooks)
        job.q, lin_acc, blk_acc = _measure_and_advance(ctx, method, stack, adapter, dtype, job.q, job.q_is_fp)
        job.q_is_fp = False
    finally:
        _close(state)
    for n, e in _err_final(lin_acc).items():
        job.diag["linears"][f"{ctx.prefix}.{n}"] = e
    job.diag["vision_blocks" if stack.is_vision else "blocks"][ctx.index] = _err_final(blk_acc)
    for n, qw in ctx.committed.items():
        job.quantized[f"{ctx.prefix}.{n}"] = QuantizedWeight(qw.qweight.cpu(), qw.scale.cpu(), qw.zero.cpu(),
                                                             qw.g_idx.cpu(), qw.spec, qw.extras)


def _close(state: _Open) -> None:
    """The stored model holds weights only (evaluation installs its own quantizers); the block goes home."""
    for h in state.act_hooks:
        h.remove()
    state.act_hooks = []
    if state.gen is not None:
        state.gen.close()
        state.gen = None
    job, ctx = state.job, state.ctx
    if job.stacks:
        job.stacks[state.k].layers[ctx.index] = ctx.block.to(state.storage)


def _fail(job: Job, e: BaseException) -> None:
    job.error = e
    job.q, job.stacks = [], []  # its streams and blocks are not needed any more


def _quantize_block(live: list[Job], k: int, i: int, first: nn.Module, storage: torch.device, shared: SharedBlock,
                    device: torch.device, dtype: torch.dtype, memo_bytes: int) -> dict[int, float]:
    """Block i of stack k for every live job: each starts its method on its own copy (the first job on the
    block the pass loaded); work the methods hand over runs together (`_run_together`), within the
    allowance; each job is finished as soon as its method is. Returns each job's own seconds (by id)."""
    grad_flags = [p.requires_grad for p in first.parameters()]
    spent = {id(j): 0.0 for j in live}  # each job's own seconds on this block
    waiting: list[_Open] = []

    def timed(job: Job, fn, *args):
        t1, before = time.perf_counter(), shared.seconds
        try:
            return fn(*args)
        except Exception as e:  # this cell failed; the pass goes on without it
            _fail(job, e)
        finally:
            spent[id(job)] += (time.perf_counter() - t1) - (shared.seconds - before)

    def advance(waiting: list[_Open]) -> list[_Open]:
        """One round of the work the open jobs wait on; the jobs their methods are done with are finished."""
        _run_together(waiting)
        still = []
        for st in waiting:
            spent[id(st.job)] += st.seconds
            st.seconds = 0.0
            if st.job.error is None and st.gen is None:
                timed(st.job, _finish_job_block, st, dtype)
            elif st.job.error is None:
                still.append(st)
        return still

    # what waits at once stays within the pass's allowance and, on a GPU, half of its free memory
    wait_bytes = memo_bytes if device.type != "cuda" else min(memo_bytes, torch.cuda.mem_get_info(device)[0] // 2)
    for n, job in enumerate(live):
        while waiting and sum(st.nbytes for st in waiting) > wait_bytes:
            waiting = advance(waiting)
        block, home = timed(job, lambda: (first, storage) if n == 0 else
                            _job_block(job.stacks[k], i, device, shared.fp_block, grad_flags)) or (None, None)
        state = timed(job, _begin_job_block, job, k, i, block, home, shared, device) if block is not None else None
        if state is not None and state.gen is None:
            timed(job, _finish_job_block, state, dtype)
        elif state is not None:
            waiting.append(state)
    while waiting:
        waiting = advance(waiting)
    return spent


def _quantize_stack(k: int, jobs: list[Job], device: torch.device, dtype: torch.dtype, progress=None,
                    memo_bytes: int = 0) -> None:
    """Stack k of every live job, in lockstep: per block, one FP copy, one FP stream and the FP values every
    job shares (`SharedBlock`); then each job quantizes its own copy of the block and advances its own stream."""
    live = [j for j in jobs if j.error is None]
    if not live:
        return
    st0 = live[0].stacks[k]
    fp = [b.hidden.to(dtype) for b in st0.batches]
    for job in live:
        job.q_is_fp = job.q_start is None or st0.is_vision
        job.q = [h.clone() for h in fp] if job.q_is_fp else [h.to(dtype) for h in job.q_start]
    label = "vision" if st0.is_vision else "blocks"
    tasks = {id(j): progress.add_task(f"{j.method.name} {j.method.spec.label} {label}", total=st0.n_blocks)
             for j in live} if progress else {}
    for i in range(st0.n_blocks):
        live = [j for j in live if j.error is None]
        if not live:
            return
        t0 = time.perf_counter()
        first, storage = _load_block(live[0].stacks[k], i, live[0].adapter, device)
        shared = SharedBlock(copy.deepcopy(first).requires_grad_(False), fp, cache=len(live) > 1, memo_bytes=memo_bytes)
        load_seconds = time.perf_counter() - t0
        spent = _quantize_block(live, k, i, first, storage, shared, device, dtype, memo_bytes)
        for job in live:
            job.seconds += spent[id(job)]
            key = "vision_block_seconds" if st0.is_vision else "block_seconds"
            job.diag.setdefault(key, {})[i] = round(spent[id(job)] + load_seconds, 3)
            if progress:
                progress.advance(tasks[id(job)])
        survivors = [j for j in live if j.error is None]
        if survivors:
            job = survivors[0]
            ctx = BlockContext(i, "", shared.fp_block, shared.fp_block, list(job.adapter.block_linears(shared.fp_block)),
                               [], fp, fp, job.stacks[k].batches, job.adapter, device, st0.is_vision, shared)
            fp = shared.next_stream(ctx, _after(st0, job.adapter),
                                    lambda b: move(st0.batches[b].extras, device, dtype))
            for j in survivors:  # the block's load and every shared value, split evenly
                j.seconds += (load_seconds + shared.seconds) / len(survivors)
        del shared
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()


def _stacks(adapter: Adapter, calib: CalibSet, method: Method, include_vision: bool,
            max_blocks: int | None) -> list[_Stack]:
    """The stacks to quantize, in order: the vision tower (when asked for), then the decoder."""
    layers = adapter.decoder_layers()
    n_dec = len(layers) if max_blocks is None else min(max_blocks, len(layers))
    stacks = [_Stack(layers, adapter.decoder_path, calib.batches, False, n_dec)]
    if include_vision:
        if not method.supports_vision:
            raise BadInput(f"method {method.name!r} cannot quantize the vision tower (it needs the decoder's block structure); accepted: quantize-vision false")
        if not calib.vision_batches:
            raise RuntimeError("the calibration set holds no vision-tower captures (capture it with vision=True)")
        vblocks = adapter.vision_blocks()
        stacks.insert(0, _Stack(vblocks, adapter.vision_blocks_path, calib.vision_batches, True, len(vblocks)))
    return stacks


def _decoder_start(job: Job, calib: CalibSet) -> None:
    """After a quantized vision tower: the decoder's quantized stream starts from what it produces."""
    model, adapter, spec = job.model, job.adapter, job.method.spec
    vision = job.stacks[0]
    prefix = vision.prefix
    hooks = (install_format_quantizers([(lin, job.quantized[f"{prefix}.{i}.{n}"]) for i, blk in enumerate(vision.layers)
                                        for n, lin in adapter.block_linears(blk).items()], spec)
             if spec.quantizes_activations else [])
    try:
        job.q_start = [adapter.capture(move(b.inputs, next(model.parameters()).device))[0].cpu() for b in calib.batches]
    finally:
        for h in hooks:
            h.remove()


def quantize_models(jobs: list[Job], calib: CalibSet, device: torch.device | str | None = None, progress=None,
                    include_vision: bool = False, max_blocks: int | None = None, memo: dict | None = None,
                    memo_bytes: int = 0) -> list[Job]:
    """Quantize every job's model in place, in one pass over the blocks (lockstep): the language-model decoder,
    and first the vision tower when `include_vision`. `memo` shares whole-run statistics of the full-precision
    model (`RunView.memo`) across jobs and passes; `memo_bytes` caps what methods share per block
    (`BlockView.memo`). A job's failure is recorded in it, not raised."""
    for job in jobs:
        job.adapter = job.adapter or adapter_for(job.model)
    device = torch.device(device) if device is not None else next(jobs[0].model.parameters()).device
    dtype = next(jobs[0].model.parameters()).dtype
    for job in jobs:
        t0 = time.perf_counter()
        try:
            job.stacks = _stacks(job.adapter, calib, job.method, include_vision, max_blocks)
            # fail before any work is done: the group size must divide every quantized layer's input width
            job.method.spec.check_widths(lin.in_features for st in job.stacks for blk in list(st.layers)[:st.n_blocks]
                                         for lin in job.adapter.block_linears(blk).values())
            job.run = RunContext(job.model, job.adapter, calib, device, memo)
            job.method.on_start(job.run)
        except Exception as e:
            _fail(job, e)
        job.seconds += time.perf_counter() - t0
    n_stacks = max((len(j.stacks) for j in jobs), default=0)
    for k in range(n_stacks):
        _quantize_stack(k, jobs, device, dtype, progress, memo_bytes)
        if k == 0 and n_stacks > 1:
            for job in jobs:
                if job.error is None:
                    try:
                        _decoder_start(job, calib)
                    except Exception as e:
                        _fail(job, e)
    for job in jobs:
        if job.error is None:
            t0 = time.perf_counter()
            try:
                job.info = job.method.on_end(job.run)
            except Exception as e:
                _fail(job, e)
            job.seconds += time.perf_counter() - t0
    return jobs


def quantize_model(model: nn.Module, adapter: Adapter, calib: CalibSet, method: Method,
                   device: torch.device | str | None = None, progress=None, include_vision: bool = False,
                   max_blocks: int | None = None) -> EngineResult:
    """Quantize one model in place, block by block (a pass with one job); its failure is raised."""
    (job,) = quantize_models([Job(model, method, adapter)], calib, device, progress, include_vision, max_blocks)
    if job.error is not None:
        raise job.error
    return job.result()
