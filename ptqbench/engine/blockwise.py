"""Block-by-block quantization engine.

For every decoder block, in order:
  1. the block moves to the compute device and a frozen full-precision copy is made;
  2. the method quantizes it through a `BlockContext` (statistics on request, one `commit` per linear);
  3. diagnostics: each linear's and the block's output error on the full-precision stream, split by
     token type (vision / text / answer);
  4. both streams advance: fp <- FP block(fp), quant <- quantized block(quant); statistics are freed
     and the block returns to storage.

Two streams are kept for every method, so GPTQ-style methods see quantized inputs (`stream="quant"`),
AWQ/MBQ see full-precision ones (`"fp"`) and GPTAQ/VLMQ get both (`"both"`). Statistics are accumulated
in fp32 over valid (non-padding) tokens only, with TF32 off.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ptqbench.models.adapters import Adapter, move
from ptqbench.engine.calibration import CalibSet
from ptqbench.models.lazy import block_seed, is_lazy, materialize_block
from ptqbench.methods.base import Method
from ptqbench.methods.quant import QuantizedWeight, QuantSpec

TOKEN_TYPES = ("vision", "text", "answer")


class _Stop(Exception):
    pass


@dataclass
class InputStats:
    H: torch.Tensor  # 2/N * sum_t w_t x_t x_t^T  (fp32, over valid tokens)
    dXXT: torch.Tensor | None  # 2/N * sum_t w_t (x_fp - x_q)_t x_q,t^T  (GPTAQ's cross term)
    n_tokens: int


@dataclass
class RunContext:
    """What `Method.on_start/on_end` may use: the model through its adapter, and the calibration set."""

    model: nn.Module
    adapter: Adapter
    calib: CalibSet
    device: torch.device
    linear_names: list[str] = field(default_factory=list)  # fully qualified names to be quantized

    def batch(self, b: int) -> tuple[torch.Tensor, dict, dict, dict, torch.Tensor]:
        cb = self.calib.batches[b]
        dtype = next(self.model.parameters()).dtype
        return (cb.hidden.to(self.device, dtype), move(cb.kwargs, self.device, dtype), move(cb.extras, self.device, dtype),
                move(cb.masks, self.device), cb.input_ids.to(self.device))


class BlockContext:
    def __init__(self, index: int, prefix: str, block: nn.Module, fp_block: nn.Module, names: list[str],
                 groups: list[list[str]], fp_in: list[torch.Tensor], q_in: list[torch.Tensor], calib: CalibSet,
                 adapter: Adapter, spec: QuantSpec, device: torch.device, batches: list | None = None,
                 is_vision: bool = False):
        self.index, self.prefix, self.block, self.fp_block = index, prefix, block, fp_block
        # Per-batch kwargs/masks/extras: the calibration set's for decoder blocks, the vision captures
        # for vision-tower blocks (is_vision: every token is a valid vision token, no answer tokens).
        self.batches = batches if batches is not None else calib.batches
        self.is_vision = is_vision
        self.linear_names, self.groups = names, groups
        self.fp_in, self.q_in, self.calib, self.adapter, self.spec, self.device = fp_in, q_in, calib, adapter, spec, device
        self.dtype = next(block.parameters()).dtype
        self.committed: dict[str, QuantizedWeight] = {}
        self.out_scales: dict[str, torch.Tensor] = {}

    # ---- access --------------------------------------------------------------------------------
    def module(self, name: str) -> nn.Linear:
        return self.block.get_submodule(name)

    def fp_module(self, name: str) -> nn.Linear:
        return self.fp_block.get_submodule(name)

    def weight(self, name: str) -> torch.Tensor:
        return self.module(name).weight.data

    @property
    def n_batches(self) -> int:
        return len(self.fp_in)

    def kwargs(self, b: int) -> dict:
        kw = self.batches[b].kwargs
        if "vision_calls" in kw:  # vision blocks: each block has its own captured call arguments
            return move(kw["vision_calls"][self.index][1], self.device, self.dtype)
        return move(kw, self.device, self.dtype)

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
        return self.adapter.run_layer(module, x, self.kwargs(b))

    # ---- statistics ------------------------------------------------------------------------------
    def _inputs(self, module: nn.Module, names: list[str], x: torch.Tensor, b: int) -> dict[str, torch.Tensor]:
        """Inputs of the named linears of `module` when it runs on x; stops as soon as all are seen."""
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
                self.run(module, x, b)
        except _Stop:
            pass
        finally:
            for h in hooks:
                h.remove()
        return got

    def _shared_input(self, names: list[str]) -> dict[str, str]:
        """name -> representative: linears in one true-sequential group read the same input."""
        rep = {}
        for n in names:
            grp = next((g for g in self.groups if n in g), [n])
            rep[n] = next(m for m in grp if m in names)
        return rep

    def input_stats(self, names: list[str], stream: str = "quant",
                    weight_fn: Callable[[str, int], torch.Tensor | None] | None = None) -> dict[str, InputStats]:
        """Masked fp32 Hessians H (and, for stream="both", GPTAQ's cross term) of the named linears.

        stream: "quant" (inputs on the quantized stream through the current, partly quantized block),
        "fp" (full-precision stream through the frozen FP block), or "both" (H from the quantized
        inputs, dXXT from the difference of the two). weight_fn(name, batch) gives per-token weights
        (B, T) (VLMQ's importance factors); they multiply each token in H and dXXT alike.
        """
        if stream not in ("quant", "fp", "both"):
            raise ValueError(f"stream {stream!r}")
        rep = self._shared_input(names) if weight_fn is None else {n: n for n in names}
        keys = sorted(set(rep.values()), key=names.index)
        acc: dict[str, list] = {}
        n_tok = 0
        torch.backends.cuda.matmul.allow_tf32 = False
        for b in range(self.n_batches):
            valid = self.masks(b)["valid"]
            if stream == "fp":
                xq = self._inputs(self.fp_block, keys, self.stream("fp", b), b)
            else:
                xq = self._inputs(self.block, keys, self.stream("quant", b), b)
            xf = self._inputs(self.fp_block, keys, self.stream("fp", b), b) if stream == "both" else None
            n_tok += int(valid.sum())
            for k in keys:
                x = xq[k][valid].float()
                w = weight_fn(k, b) if weight_fn else None
                xw = x if w is None else x * w[valid].float()[:, None]
                if k not in acc:
                    d = x.shape[-1]
                    acc[k] = [torch.zeros(d, d, device=x.device), None if xf is None else torch.zeros(d, d, device=x.device)]
                acc[k][0] += xw.T @ x
                if xf is not None:
                    dx = xf[k][valid].float() - x
                    dxw = dx if w is None else dx * w[valid].float()[:, None]
                    acc[k][1] += dxw.T @ x
        scale = 2.0 / max(n_tok, 1)
        out: dict[str, InputStats] = {}
        for k, (H, D) in acc.items():
            H *= scale
            if D is not None:
                D *= scale
            out[k] = InputStats(H, D, n_tok)
        return {n: out[rep[n]] for n in names}

    def capture_inputs(self, names: list[str], stream: str = "fp") -> dict[str, list[torch.Tensor]]:
        """Full-shape inputs (B, T, d) of the named linears for every batch (kept on the compute device)."""
        module = self.fp_block if stream == "fp" else self.block
        out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        for b in range(self.n_batches):
            got = self._inputs(module, names, self.stream(stream, b), b)
            for n in names:
                out[n].append(got[n])
        return out

    # ---- results ---------------------------------------------------------------------------------
    def commit(self, name: str, qw: QuantizedWeight) -> None:
        lin = self.module(name)
        if tuple(qw.qweight.shape) != tuple(lin.weight.shape):
            raise ValueError(f"{name}: quantized shape {tuple(qw.qweight.shape)} != weight {tuple(lin.weight.shape)}")
        lin.weight.data = qw.dequantize().to(lin.weight.device, lin.weight.dtype)
        self.committed[name] = qw

    def set_output_scale(self, name: str, scale: torch.Tensor) -> None:
        """A method that divides a linear's outputs by `scale` (AWQ's v->o, up->down folding) says so,
        so diagnostics compare like with like."""
        self.out_scales[name] = scale


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


def _quantize_stack(layers: nn.ModuleList, prefix: str, batches: list, q_start: list[torch.Tensor] | None,
                    method: Method, adapter: Adapter, calib: CalibSet, device: torch.device, dtype: torch.dtype,
                    quantized: dict, diag: dict, is_vision: bool, progress=None, max_blocks: int | None = None) -> None:
    """Quantize one stack of blocks in place. `batches` hold the stack's FP inputs (`hidden`) with
    their kwargs/masks/extras; `q_start` the quantized stream's inputs (None: same as FP)."""
    fp = [b.hidden.to(dtype) for b in batches]
    q = [h.to(dtype) for h in q_start] if q_start is not None else [h.clone() for h in fp]
    after = (lambda i, h, e: h) if is_vision else adapter.after_layer
    label = "vision" if is_vision else "blocks"
    n_blocks = len(layers) if max_blocks is None else min(max_blocks, len(layers))
    task = progress.add_task(f"{method.name} w{method.spec.bits} {label}", total=n_blocks) if progress else None
    for i, layer in enumerate(layers):
        if i >= n_blocks:
            break
        t0 = time.perf_counter()
        if is_lazy(layer):  # a random-weight block on meta: materialize it on the device, keep the result on CPU
            storage = torch.device("cpu")
            block = materialize_block(layer, adapter.model, device, block_seed(adapter.model, i))
        else:
            storage = next(layer.parameters()).device
            block = layer.to(device)
        fp_block = copy.deepcopy(block).requires_grad_(False)
        names = list(adapter.block_linears(block))
        ctx = BlockContext(i, f"{prefix}.{i}", block, fp_block, names, adapter.sequential_groups(names), fp, q,
                           calib, adapter, method.spec, device, batches=batches, is_vision=is_vision)
        method.quantize_block(ctx)
        missing = [n for n in names if n not in ctx.committed]
        if missing:
            raise RuntimeError(f"method {method.name!r} left linears of {prefix}.{i} unquantized: {missing}")

        lin_acc: dict = {}
        blk_acc: dict = {}
        new_fp, new_q = [], []
        with torch.no_grad():
            for b in range(len(fp)):
                masks = ctx.masks(b)
                extras = move(batches[b].extras, device, dtype)
                ys_fp, ys_q = {}, {}
                hooks = [fp_block.get_submodule(n).register_forward_hook(lambda m, a, y, n=n: ys_fp.__setitem__(n, y)) for n in names]
                hooks += [block.get_submodule(n).register_forward_hook(lambda m, a, y, n=n: ys_q.__setitem__(n, y)) for n in names]
                out_fp = ctx.run(fp_block, ctx.stream("fp", b), b)
                out_qfp = ctx.run(block, ctx.stream("fp", b), b)
                for h in hooks:
                    h.remove()
                for n in names:
                    y = ys_q[n] * ctx.out_scales[n].to(ys_q[n]) if n in ctx.out_scales else ys_q[n]
                    _err_update(lin_acc, n, y, ys_fp[n], masks)
                _err_update(blk_acc, "block_on_fp_input", out_qfp, out_fp, masks)
                out_q = ctx.run(block, ctx.stream("quant", b), b)
                out_fp = after(i, out_fp, extras)
                out_q = after(i, out_q, extras)
                _err_update(blk_acc, "stream", out_q, out_fp, masks)
                new_fp.append(out_fp.to(fp[b].device))
                new_q.append(out_q.to(q[b].device))
        fp, q = new_fp, new_q
        for n, e in _err_final(lin_acc).items():
            diag["linears"][f"{prefix}.{i}.{n}"] = e
        diag["vision_blocks" if is_vision else "blocks"][i] = _err_final(blk_acc)
        for n, qw in ctx.committed.items():
            quantized[f"{prefix}.{i}.{n}"] = QuantizedWeight(qw.qweight.cpu(), qw.scale.cpu(), qw.zero.cpu(), qw.g_idx.cpu(), qw.spec, qw.extras)
        layers[i] = block.to(storage)
        del fp_block, ctx
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        # Wall seconds per block (materialize, quantize, both streams): cost runs read these.
        diag.setdefault("vision_block_seconds" if is_vision else "block_seconds", {})[i] = round(time.perf_counter() - t0, 3)
        if progress:
            progress.advance(task)


def quantize_model(model: nn.Module, adapter: Adapter, calib: CalibSet, method: Method,
                   device: torch.device | str | None = None, progress=None, include_vision: bool = False,
                   max_blocks: int | None = None) -> EngineResult:
    """Quantize the language-model decoder in place, block by block (and first the vision tower when
    `include_vision`: its quantized output then feeds the decoder's quantized stream)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    layers = adapter.decoder_layers()
    prefix = adapter.decoder_path
    dtype = next(model.parameters()).dtype
    n_dec = len(layers) if max_blocks is None else min(max_blocks, len(layers))
    linear_names = [f"{prefix}.{i}.{n}" for i, blk in enumerate(layers) if i < n_dec for n in adapter.block_linears(blk)]
    if include_vision:
        if not method.supports_vision:
            from ptqbench.errors import BadInput

            raise BadInput(f"method {method.name!r} cannot quantize the vision tower (it needs the decoder's block structure); accepted: quantize-vision false")
        if not calib.vision_batches:
            raise RuntimeError("the calibration set holds no vision-tower captures (capture it with vision=True)")
        vblocks = adapter.vision_blocks()
        linear_names = [f"{adapter.vision_blocks_path}.{i}.{n}" for i, blk in enumerate(vblocks)
                        for n in adapter.block_linears(blk)] + linear_names
    for name in linear_names:
        method.spec.groups_for(model.get_submodule(name).in_features)  # fail before any work is done
    run = RunContext(model, adapter, calib, device, linear_names)
    method.on_start(run)

    quantized: dict[str, QuantizedWeight] = {}
    diag: dict = {"linears": {}, "blocks": {}, "vision_blocks": {}}
    q_start = None
    if include_vision:
        _quantize_stack(vblocks, adapter.vision_blocks_path, calib.vision_batches, None, method, adapter, calib,
                        device, dtype, quantized, diag, True, progress)
        # The decoder's quantized stream starts from what the quantized vision tower produces.
        q_start = [adapter.capture(move(b.inputs, next(model.parameters()).device))[0].cpu() for b in calib.batches]
    _quantize_stack(layers, prefix, calib.batches, q_start, method, adapter, calib, device, dtype, quantized, diag,
                    False, progress, max_blocks=max_blocks)
    info = method.on_end(run)
    return EngineResult(quantized, diag, info)
