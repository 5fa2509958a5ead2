#!/usr/bin/env python
"""Which kernel runs a weight-activation (W8A8 / W4A8) linear fastest on this CPU? (issue 19, item 6)

For each linear shape (out x in), token count M and dtype, times in interleaved rounds (one block of
calls of every path in turn, so a burst of load on a shared machine hits all paths alike):

- ``dense``: F.linear with the dequantized weight, activations unquantized (the full-precision cost);
- ``fake-wa``: `quantize_activation(x, 8)` (per-token symmetric fake quant) + dense F.linear of the
  dequantized weight: what evaluation computes, and the fallback kernel;
- ``intmm``: per-token int8 codes of x + ``torch._int_mm`` (int8 x int8 -> int32) on per-channel
  symmetric int8 weight codes, the int32 result scaled by the token and channel scales in fp32;
- ``intmm-g{G}``: the same with group-wise weight scales, one ``_int_mm`` per group of G input columns;
- ``int8dyn``: ptqbench's QuantLinear kernel of that name (deploy/kernels.py), when it exists;
- ``fakeA+int8pack`` / ``fakeA+int4pack`` (bf16): fake-quantized activations into the weight-only aten
  kernels (the fastest weight-only paths of docs/kernels.md);
- ``ao-int8dyn`` / ``ao-int8-int4w``: torchao's `Int8DynamicActivationInt8WeightConfig` and
  `Int8DynamicActivationIntxWeightConfig(int4, per-channel)` applied with `quantize_` (eager), when
  torchao imports (it is not a dependency: put a wheel's --target folder on PYTHONPATH).

Every path's output is also compared with the fp32 fake-quant reference (relative Frobenius error),
so a fast path that is not the same computation shows it. Prints the load average before and after.

``--model testbed`` instead deploys a whole model (`ptqbench.models.sources.load_model` names) with RTN
per-channel weights in each W/A format and kernel (int8dyn, the fake weight, the weight-only kernel after a
simulated quantizer) and times them all with `latency.measure_interleaved`, as the grid does.

    OMP_NUM_THREADS=1 PYTHONPATH=. python experiments/wa_kernels.py
    python experiments/wa_kernels.py --shapes 896x896,4864x896 --tokens 1,256 --dtypes bfloat16 --threads 2
    OMP_NUM_THREADS=1 PYTHONPATH=. python experiments/wa_kernels.py --model testbed --dtypes bfloat16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptqbench.deploy import kernels as K  # noqa: E402
from ptqbench.methods.quant import QuantSpec, quantize_activation, quantize_rtn  # noqa: E402

# the testbed's decoder (q/o, k/v, gate/up, down) and vision (qkv, fc1) linears, then a 0.5B-class decoder
SHAPES = "256x256,128x256,768x256,256x768,384x128,512x128,896x896,4864x896,896x4864"


def act_codes(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, fp32 per-token scales) with exactly quantize_activation's arithmetic."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5) / (2 ** (bits - 1) - 1)
    return torch.round(xf / scale).to(torch.int8), scale


def int_paths(qw, dtype, group: int) -> dict:
    """The torch._int_mm paths for the symmetric weight `qw` (per-channel) and its group-wise variant."""
    w8 = (qw.qweight.to(torch.int32) - qw.zero[:, :1].to(torch.int32)).to(torch.int8)
    w8t, ws = w8.t(), qw.scale[:, 0].float()

    def intmm(x):
        xq, xs = act_codes(x)
        return torch._int_mm(xq, w8t).float().mul_(xs).mul_(ws).to(dtype)

    n, k = w8.shape
    gw = w8.t().reshape(k // group, group, n)  # (groups, G, N) views of the same codes
    gs = qw.scale[:, :1].float().expand(n, k // group).t().contiguous()  # stand-in group scales (groups, N)

    def intmm_grouped(x):
        xq, xs = act_codes(x)
        acc = torch.zeros(x.shape[0], n)
        for g in range(k // group):
            acc.addcmul_(torch._int_mm(xq[:, g * group:(g + 1) * group].contiguous(), gw[g]).float(), gs[g])
        return acc.mul_(xs).to(dtype)

    return {"intmm": intmm, f"intmm-g{group}": intmm_grouped}


def torchao_paths(w_hat: torch.Tensor, dtype) -> dict:
    """torchao's eager dynamic-activation configs, or {} with the reason printed when they do not load."""
    try:
        from torchao.quantization import (Int8DynamicActivationInt8WeightConfig,
                                          Int8DynamicActivationIntxWeightConfig, quantize_)
        from torchao.quantization.granularity import PerAxis
    except Exception as e:  # noqa: BLE001 - optional
        print(f"# torchao not used: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        return {}
    out = {}
    for name, cfg in (("ao-int8dyn", Int8DynamicActivationInt8WeightConfig()),
                      ("ao-int8-int4w", Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                                              weight_granularity=PerAxis(0)))):
        lin = torch.nn.Linear(w_hat.shape[1], w_hat.shape[0], bias=False).to(dtype)
        lin.weight.data = w_hat.to(dtype)
        try:
            quantize_(lin, cfg)
            out[name] = lin
        except Exception as e:  # noqa: BLE001
            print(f"# {name}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    return out


def paths_for(n: int, k: int, dtype, group: int, with_ao: bool) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) / k**0.5
    qw8 = quantize_rtn(w, QuantSpec(bits=8, group_size=-1, sym=True))
    w_hat = qw8.dequantize()
    wd = w_hat.to(dtype)
    paths = {"dense": lambda x: F.linear(x, wd), "fake-wa": lambda x: F.linear(quantize_activation(x, 8), wd)}
    paths.update(int_paths(qw8, dtype, group if k % group == 0 else k))
    if "int8dyn" in getattr(K, "KERNELS", ()):
        wa = QuantSpec(bits=8, group_size=-1, sym=True, act_bits=8)
        qwa = quantize_rtn(w, wa)
        if K.kernel_unsupported(qwa, "int8dyn", torch.device("cpu"), dtype) is None:
            paths["int8dyn"] = K.QuantLinear(qwa, None, "int8dyn", dtype, torch.device("cpu"))
    if dtype == torch.bfloat16:
        l8 = K.QuantLinear(qw8, None, "int8pack", dtype, torch.device("cpu"))
        paths["fakeA+int8pack"] = lambda x: l8(quantize_activation(x, 8))
        qw4 = quantize_rtn(w, QuantSpec(bits=4, group_size=-1, sym=True))
        if K.kernel_unsupported(qw4, "int4pack", torch.device("cpu"), dtype) is None:
            l4 = K.QuantLinear(qw4, None, "int4pack", dtype, torch.device("cpu"))
            paths["fakeA+int4pack"] = lambda x: l4(quantize_activation(x, 8))
    if with_ao:
        paths.update(torchao_paths(w_hat, dtype))
    return paths, w_hat


def time_block(f, x, budget_s: float) -> float:
    """ms per call over a block of calls lasting about budget_s."""
    n, t0 = 0, time.perf_counter()
    while True:
        f(x)
        n += 1
        dt = time.perf_counter() - t0
        if dt >= budget_s:
            return 1e3 * dt / n


@torch.inference_mode()
def bench(n: int, k: int, m: int, dtype, rounds: int, budget_s: float, group: int, with_ao: bool) -> None:
    paths, w_hat = paths_for(n, k, dtype, group, with_ao)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = F.linear(quantize_activation(x.float(), 8), w_hat)
    err = {}
    for name, f in paths.items():
        y = f(x).float()
        err[name] = float((y - ref).norm() / ref.norm())
    times = {name: [] for name in paths}
    for f in paths.values():
        time_block(f, x, budget_s / 4)  # warm-up
    for _ in range(rounds):
        for name, f in paths.items():
            times[name].append(time_block(f, x, budget_s))
    base = times["fake-wa"]
    dt = str(dtype).removeprefix("torch.")
    for name, ts in times.items():
        ratio = statistics.median(a / b for a, b in zip(ts, base))
        print(f"{n}x{k:<6} M={m:<4} {dt:<9} {name:<15} {statistics.median(ts):9.4f} ms  x{ratio:6.3f} of fake-wa"
              f"  rel.err {err[name]:.1e}", flush=True)


def model_latency(name: str, dtype, new_tokens: int) -> None:
    """Whole-model prefill / decode of each W/A format and kernel, timed in interleaved rounds."""
    import copy

    from ptqbench.deploy.latency import measure_interleaved
    from ptqbench.models.adapters import adapter_for
    from ptqbench.models.sources import load_model

    lm = load_model(name)
    models = {"FP dense": copy.deepcopy(lm.model).to(dtype)}
    for bits, act_bits, kernel in ((8, 8, "int8dyn"), (8, 8, "fake"), (8, 16, "auto"), (4, 8, "int8dyn"),
                                   (4, 8, "fake"), (4, 8, "int4pack"), (4, 16, "auto")):
        model = copy.deepcopy(lm.model)
        ad = adapter_for(model)
        spec = QuantSpec(bits=bits, group_size=-1, sym=True, act_bits=act_bits)
        quantized = {f"{ad.decoder_path}.{i}.{n}": quantize_rtn(m.weight.data.float(), spec)
                     for i, blk in enumerate(ad.decoder_layers()) for n, m in ad.block_linears(blk).items()}
        used = K.deploy(model, quantized, kernel, dtype=dtype)
        models[f"{spec.label} {K.kernel_label(model)} ({len(set(used.values()))} kind)"] = model.eval()
    res = measure_interleaved(models, lm.processor, new_tokens=new_tokens)
    for key, r in res.items():
        if isinstance(r, BaseException):
            print(f"{key:<45} failed: {r}")
            continue
        print(f"{key:<45} prefill {r['prefill_ms']:8.2f} ms (CV {r['prefill_ms_cv']:.0%})  decode {r['decode_tok_s']:7.1f} "
              f"tok/s (CV {r['decode_tok_s_cv']:.0%})  {r['model_bytes'] / 1e6:.2f} MB  n={r['repeats']}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=SHAPES, help="out x in, comma-separated")
    ap.add_argument("--tokens", default="1,256", help="token counts M, comma-separated")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--block-ms", type=float, default=20.0, help="time of one block of calls of a path")
    ap.add_argument("--group", type=int, default=128, help="group size of the intmm-g path")
    ap.add_argument("--no-torchao", action="store_true")
    ap.add_argument("--model", default="", help="time whole deployed models instead (e.g. testbed)")
    ap.add_argument("--new-tokens", type=int, default=8, help="decode tokens timed with --model")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
          f"cpu {torch.backends.cpu.get_cpu_capability()}, threads {a.threads}, load {os.getloadavg()}")
    if a.model:
        for dt in a.dtypes.split(","):
            model_latency(a.model, getattr(torch, dt), a.new_tokens)
        print(f"# done, load {os.getloadavg()}")
        return 0
    for dt in a.dtypes.split(","):
        for shape in a.shapes.split(","):
            n, k = (int(v) for v in shape.split("x"))
            for m in (int(v) for v in a.tokens.split(",")):
                bench(n, k, m, getattr(torch, dt), a.rounds, a.block_ms / 1e3, a.group, not a.no_torchao)
    print(f"# done, load {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
