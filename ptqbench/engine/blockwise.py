"""Block-by-block quantization engine.

For every decoder block, in order:
  1. the block moves to the compute device and a frozen full-precision copy is made;
  2. the method quantizes it through a `BlockContext` (inputs on request, one `commit` per linear);
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
import time
from dataclasses import dataclass

import torch
from torch import nn

from ptqbench.engine.calibration import CalibSet
from ptqbench.errors import BadInput
from ptqbench.methods.base import BlockView, Method, RunBatch, RunView
from ptqbench.methods.quant import QuantizedWeight, install_activation_quantizers
from ptqbench.models.adapters import Adapter, move
from ptqbench.models.lazy import block_seed, is_lazy, materialize_block

TOKEN_TYPES = ("vision", "text", "answer")


class _Stop(Exception):
    pass


class RunContext(RunView):
    """What `Method.on_start/on_end` see: the decoder through its adapter, and the calibration set."""

    def __init__(self, model: nn.Module, adapter: Adapter, calib: CalibSet, device: torch.device):
        self.model, self._adapter, self._calib, self.device = model, adapter, calib, device
        self.layout = adapter.decoder_layout
        self.n_samples = len(calib)
        self.n_batches = len(calib.batches)

    def decoder_layers(self) -> nn.ModuleList:
        return self._adapter.decoder_layers()

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


class BlockContext(BlockView):
    """One block of a stack, as the method sees it (see `BlockView`). `batches` hold the per-batch
    kwargs/masks: the calibration set's for decoder blocks, the vision captures for vision-tower blocks
    (`is_vision`: every token is a valid vision token, no answer tokens, no layout)."""

    def __init__(self, index: int, prefix: str, block: nn.Module, fp_block: nn.Module, names: list[str],
                 groups: list[list[str]], fp_in: list[torch.Tensor], q_in: list[torch.Tensor], batches: list,
                 adapter: Adapter, device: torch.device, is_vision: bool = False):
        self.index, self.prefix, self.block, self.fp_block = index, prefix, block, fp_block
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
        """Inputs of the named linears; the forward stops as soon as all are seen."""
        module = {"fp": self.fp_block, "quant": self.block}[stream]
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
                self.run(module, self.stream(stream, b), b)
        except _Stop:
            pass
        finally:
            for h in hooks:
                h.remove()
        return got

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


def _err_update(acc: dict, key: str, y: torch.Tensor, ref: torch.Tensor, masks: dict) -> None:
    d = (y.float() - ref.float()).pow(2).sum(-1)
    r = ref.float().pow(2).sum(-1)
    e = acc.setdefault(key, {t: [0.0, 0.0, 0] for t in ("all",) + TOKEN_TYPES})
    for t in ("all",) + TOKEN_TYPES:
        m = masks["valid" if t == "all" else t]
        e[t][0] += float(d[m].sum())
        e[t][1] += float(r[m].sum())
        e[t][2] += int(m.sum())


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


def _load_block(stack: _Stack, i: int, adapter: Adapter, device: torch.device) -> tuple[nn.Module, torch.device]:
    """Block i on the compute device, and where it is stored. A random-weight block on meta is
    materialized on the device and kept on the CPU afterwards."""
    layer = stack.layers[i]
    if is_lazy(layer):
        return materialize_block(layer, adapter.model, device, block_seed(adapter.model, i)), torch.device("cpu")
    storage = next(layer.parameters()).device
    return layer.to(device), storage


@torch.no_grad()
def _measure_and_advance(ctx: BlockContext, method: Method, stack: _Stack, adapter: Adapter, dtype: torch.dtype,
                         fp: list[torch.Tensor], q: list[torch.Tensor]) -> tuple[list, list, dict, dict]:
    """Per-linear and block errors on the FP stream, then both streams through the block. Returns the
    next streams and the two error accumulators."""
    block, fp_block, names, i = ctx.block, ctx.fp_block, ctx.linear_names, ctx.index
    after = (lambda i, h, e: h) if stack.is_vision else adapter.after_layer
    lin_acc: dict = {}
    blk_acc: dict = {}
    new_fp, new_q = [], []
    for b in range(len(fp)):
        masks = ctx.masks(b)
        extras = move(stack.batches[b].extras, ctx.device, dtype)
        ys_fp, ys_q = {}, {}
        hooks = [fp_block.get_submodule(n).register_forward_hook(lambda m, a, y, n=n: ys_fp.__setitem__(n, y)) for n in names]
        hooks += [block.get_submodule(n).register_forward_hook(lambda m, a, y, n=n: ys_q.__setitem__(n, y)) for n in names]
        out_fp = ctx.run(fp_block, ctx.stream("fp", b), b)
        out_qfp = ctx.run(block, ctx.stream("fp", b), b)
        for h in hooks:
            h.remove()
        for n in names:
            _err_update(lin_acc, n, method.comparable_output(ctx, n, ys_q[n]), ys_fp[n], masks)
        _err_update(blk_acc, "block_on_fp_input", out_qfp, out_fp, masks)
        out_q = ctx.run(block, ctx.stream("quant", b), b)
        out_fp = after(i, out_fp, extras)
        out_q = after(i, out_q, extras)
        _err_update(blk_acc, "stream", out_q, out_fp, masks)
        new_fp.append(out_fp.to(fp[b].device))
        new_q.append(out_q.to(q[b].device))
    return new_fp, new_q, lin_acc, blk_acc


def _quantize_stack(stack: _Stack, q_start: list[torch.Tensor] | None, method: Method, adapter: Adapter,
                    device: torch.device, dtype: torch.dtype, quantized: dict, diag: dict, progress=None) -> None:
    """Quantize one stack of blocks in place; `q_start` holds the quantized stream's inputs (None: the
    same as the FP stream's)."""
    fp = [b.hidden.to(dtype) for b in stack.batches]
    q = [h.to(dtype) for h in q_start] if q_start is not None else [h.clone() for h in fp]
    label = "vision" if stack.is_vision else "blocks"
    spec = method.spec
    task = progress.add_task(f"{method.name} {spec.label} {label}", total=stack.n_blocks) if progress else None
    for i in range(stack.n_blocks):
        t0 = time.perf_counter()
        block, storage = _load_block(stack, i, adapter, device)
        fp_block = copy.deepcopy(block).requires_grad_(False)
        names = list(adapter.block_linears(block))
        act_hooks = (install_activation_quantizers([block.get_submodule(n) for n in names], spec.act_bits)
                     if spec.quantizes_activations else [])
        ctx = BlockContext(i, f"{stack.prefix}.{i}", block, fp_block, names, adapter.sequential_groups(names), fp, q,
                           stack.batches, adapter, device, is_vision=stack.is_vision)
        method.quantize_block(ctx)
        missing = [n for n in names if n not in ctx.committed]
        if missing:
            raise RuntimeError(f"method {method.name!r} left linears of {stack.prefix}.{i} unquantized: {missing}")
        fp, q, lin_acc, blk_acc = _measure_and_advance(ctx, method, stack, adapter, dtype, fp, q)
        for h in act_hooks:  # the stored model holds weights only; evaluation installs its own quantizers
            h.remove()
        for n, e in _err_final(lin_acc).items():
            diag["linears"][f"{stack.prefix}.{i}.{n}"] = e
        diag["vision_blocks" if stack.is_vision else "blocks"][i] = _err_final(blk_acc)
        for n, qw in ctx.committed.items():
            quantized[f"{stack.prefix}.{i}.{n}"] = QuantizedWeight(qw.qweight.cpu(), qw.scale.cpu(), qw.zero.cpu(),
                                                                   qw.g_idx.cpu(), qw.spec, qw.extras)
        stack.layers[i] = block.to(storage)
        del fp_block, ctx
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        # Wall seconds per block (materialize, quantize, both streams): cost runs read these.
        diag.setdefault("vision_block_seconds" if stack.is_vision else "block_seconds", {})[i] = round(time.perf_counter() - t0, 3)
        if progress:
            progress.advance(task)


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


def quantize_model(model: nn.Module, adapter: Adapter, calib: CalibSet, method: Method,
                   device: torch.device | str | None = None, progress=None, include_vision: bool = False,
                   max_blocks: int | None = None) -> EngineResult:
    """Quantize the language-model decoder in place, block by block (and first the vision tower when
    `include_vision`: its quantized output then feeds the decoder's quantized stream)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    stacks = _stacks(adapter, calib, method, include_vision, max_blocks)
    # fail before any work is done: the group size must divide every quantized layer's input width
    method.spec.check_widths(lin.in_features for st in stacks for blk in list(st.layers)[:st.n_blocks]
                             for lin in adapter.block_linears(blk).values())
    run = RunContext(model, adapter, calib, device)
    method.on_start(run)

    quantized: dict[str, QuantizedWeight] = {}
    diag: dict = {"linears": {}, "blocks": {}, "vision_blocks": {}}
    q_start = None
    for stack in stacks:
        _quantize_stack(stack, q_start, method, adapter, device, dtype, quantized, diag, progress)
        if stack.is_vision:  # the decoder's quantized stream starts from what the quantized vision tower produces
            hooks = (install_activation_quantizers([blk.get_submodule(n) for blk in stack.layers for n in adapter.block_linears(blk)],
                                                   method.spec.act_bits) if method.spec.quantizes_activations else [])
            q_start = [adapter.capture(move(b.inputs, next(model.parameters()).device))[0].cpu() for b in calib.batches]
            for h in hooks:
                h.remove()
    info = method.on_end(run)
    return EngineResult(quantized, diag, info)
