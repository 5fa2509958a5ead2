"""Inference cost of a (deployed) model: prefill latency, decode throughput, peak memory, kernel.

`measure_inference(model, processor, image=..., prompt=..., device=...)` runs `warmup + repeats`
rounds on one fixed input (the same image and prompt copied `batch_size` times, so rows need no
padding and every cell sees the same tokens). Each round is:

- prefill: one forward over the whole prompt with `use_cache=True` (and `logits_to_keep=1` when the
  model takes it, as `generate` does), timed alone -> `prefill_ms` (vision tower included);
- decode: `model.generate` greedy with KV cache and exactly `new_tokens` new tokens (EOS suppressed by
  `min_new_tokens`). A logits processor stamps the time each step's logits arrive; the first stamp
  closes the prefill, the following `new_tokens - 1` stamps each close one decode step (one forward
  of one token per row + greedy pick). `decode_tok_s = batch_size * (new_tokens - 1) / (last - first
  stamp)`: generated tokens per second over all rows, prefill and `generate`'s set-up excluded (total
  time minus a separately timed prefill would mix in both). `decode_step_ms`, the median of all
  single steps, is returned too: on a shared CPU, steps are bimodal (a preempted step takes one
  scheduler slice longer), which moves the throughput more than the median step.

Reported: medians over the `repeats` timed rounds, spread = interquartile range (q3 - q1, quartiles
by the 'inclusive' method) of the same values; all values, min and max are in the result too.
Peak memory `infer_peak_bytes` is the increase over the memory in use before the first round, over
all rounds (warm-up included, since it allocates first): CUDA `max_memory_allocated` minus
`memory_allocated` before; CPU the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs after glibc's free memory is returned with malloc_trim) minus the RSS before,
or, where VmHWM cannot be reset, `measure.measure`'s sampled RSS. The weights are not in it (they are
loaded before): `kernels.model_nbytes` gives those. The absolute peak (CUDA allocated / process RSS,
which on CPU includes whatever else the process holds) is returned as `infer_peak_bytes_abs`.
"""

from __future__ import annotations

import gc
import inspect
import random
import statistics
import time
from collections import Counter

import torch

from ptqbench.deploy.kernels import QuantLinear, deploy, kernel_label, model_nbytes
from ptqbench.engine.chat import generation_prompt, to_device
from ptqbench.errors import BadInput

ROW_FIELDS = ("model_bytes", "prefill_ms", "prefill_ms_spread", "decode_tok_s", "decode_tok_s_spread", "infer_peak_bytes", "kernel")
DEFAULT_PROMPT = "Describe the picture in one sentence."


def probe_image(width: int = 224, height: int = 224, seed: int = 0):
    """A fixed synthetic RGB picture (the tiny models' generator), for inputs that compare across runs."""
    from ptqbench.models.tiny import tiny_image

    return tiny_image(random.Random(seed), width, height)


# ---- memory -------------------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _PeakMemory:
    """Peak memory over a phase (see the module docstring for the three ways): `peak` is the increase
    over the start of the phase, `peak_abs` the absolute peak (CUDA allocated / process RSS)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = ""
        self._sampler = None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.kind = "cuda-peak-allocated-delta"
            return self
        _malloc_trim()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.base = _status_kb("VmRSS")
            if self.base is None or _status_kb("VmHWM") is None:
                raise OSError("no VmRSS/VmHWM")
            self.kind = "cpu-peak-rss-delta (VmHWM)"
        except OSError:
            from ptqbench.deploy.measure import measure, rss_bytes

            self.base = rss_bytes()
            self._sampler = measure(self.device, interval=0.005)
            self._m = self._sampler.__enter__()
            self.kind = "cpu-rss-delta (sampled every 5 ms)"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_abs = int(torch.cuda.max_memory_allocated(self.device))
        elif self._sampler is not None:
            self._sampler.__exit__(*exc)
            self.peak_abs = int(self._m.peak_bytes)  # measure() reports the absolute peak RSS
        else:
            self.peak_abs = int(_status_kb("VmHWM") or 0)
        self.peak = int(max(0, self.peak_abs - self.base))
        return False


# ---- timing ---------------------------------------------------------------------------------------
class _StepClock:
    """A logits processor that only records when each generation step's logits are ready."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return scores


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _spread(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return float(q3 - q1)


def _positive_int(name: str, v, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise BadInput(f"{name} {v!r} is not accepted; accepted: an integer >= {minimum}")
    return v


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    for p in list(model.parameters()) + list(model.buffers()):
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def build_inputs(processor, image, prompt: str, batch_size: int, device, dtype) -> dict:
    """Processor batch of `batch_size` identical one-image chats ending in the generation prompt."""
    text = generation_prompt(processor, prompt, 1)
    enc = processor(text=[text] * batch_size, images=[[image] for _ in range(batch_size)], padding=True,
                    return_tensors="pt")
    return to_device(enc, device, float_dtype=dtype)


def _target_device(model, device) -> tuple[torch.device, torch.device, torch.dtype]:
    """(where the model is, where it is to run, its dtype); refuses int4pack layers packed for another device."""
    here, dtype = _model_device_dtype(model)
    device = torch.device(device) if device is not None else here
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    wrong = sorted({m.layout for m in model.modules() if isinstance(m, QuantLinear) and m.kernel == "int4pack"} - {device.type})
    if wrong:
        raise BadInput(f"the model's int4pack layers were packed for {', '.join(wrong)} but device is {device.type}; "
                       "accepted: the device the model was deployed on")
    return here, device, dtype


def _prefill_kwargs(model) -> dict:
    """What `generate` passes to the prefill forward: the KV cache, and only the last logits when supported."""
    fwd_kw = {"use_cache": True}
    try:
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            fwd_kw["logits_to_keep"] = 1
    except (TypeError, ValueError):
        pass
    return fwd_kw


def _timed_rounds(model, enc: dict, processor, device: torch.device, new_tokens: int, batch_size: int,
                  warmup: int, repeats: int, seed: int) -> tuple[dict[str, list[float]], _PeakMemory]:
    """The per-round timings (prefill, decode, ttft in ms / tok/s, and every single decode step) of the
    `repeats` rounds after `warmup`, and the peak memory over all of them."""
    from transformers import LogitsProcessorList

    prompt_tokens = int(enc["input_ids"].shape[1])
    fwd_kw = _prefill_kwargs(model)
    tok = getattr(processor, "tokenizer", processor)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    gen_kw = dict(do_sample=False, num_beams=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True,
                  pad_token_id=pad)
    t: dict[str, list[float]] = {"prefill": [], "decode": [], "ttft": [], "steps": []}
    with _PeakMemory(device) as mem:
        for i in range(warmup + repeats):
            torch.manual_seed(seed)
            _sync(device)
            t0 = time.perf_counter()
            out = model(**enc, **fwd_kw)
            _sync(device)
            t1 = time.perf_counter()
            del out
            clock = _StepClock(device)
            t2 = time.perf_counter()
            gen = model.generate(**enc, logits_processor=LogitsProcessorList([clock]), **gen_kw)
            if gen.shape[1] - prompt_tokens != new_tokens or len(clock.stamps) != new_tokens:
                raise RuntimeError(f"generate produced {gen.shape[1] - prompt_tokens} tokens in {len(clock.stamps)} "
                                   f"steps; expected {new_tokens}")
            if i < warmup:
                continue
            t["prefill"].append(1e3 * (t1 - t0))
            t["ttft"].append(1e3 * (clock.stamps[0] - t2))
            t["decode"].append(batch_size * (new_tokens - 1) / (clock.stamps[-1] - clock.stamps[0]))
            t["steps"] += [1e3 * (b - a) for a, b in zip(clock.stamps, clock.stamps[1:])]
    return t, mem


@torch.inference_mode()
def measure_inference(model, processor, *, image=None, prompt: str = DEFAULT_PROMPT, new_tokens: int = 16,
                      batch_size: int = 1, warmup: int = 2, repeats: int = 5, device=None, seed: int = 0,
                      threads: int | None = None) -> dict:
    """Prefill latency, decode throughput and peak memory of `model` on one fixed input (module
    docstring). `image`: a PIL image (default `probe_image()`); `device`: where the model runs (default:
    where its parameters are; the model is moved there, which a model deployed with int4pack for
    another device refuses); `threads`: CPU threads to use while measuring (restored afterwards; on
    a shared, oversubscribed CPU one thread gives steadier numbers). Returns the ROW_FIELDS
    (`model_bytes` from kernels.model_nbytes, `prefill_ms`, `prefill_ms_spread`, `decode_tok_s`,
    `decode_tok_s_spread`, `infer_peak_bytes`, `kernel`) and details."""
    new_tokens = _positive_int("new_tokens", new_tokens, 2)
    batch_size = _positive_int("batch_size", batch_size)
    repeats = _positive_int("repeats", repeats)
    warmup = _positive_int("warmup", warmup, 0)
    if threads is not None:
        _positive_int("threads", threads)
        old_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return measure_inference(model, processor, image=image, prompt=prompt, new_tokens=new_tokens,
                                     batch_size=batch_size, warmup=warmup, repeats=repeats, device=device, seed=seed)
        finally:
            torch.set_num_threads(old_threads)
    here, device, dtype = _target_device(model, device)
    if here != device:
        model.to(device)
    model.eval()
    enc = build_inputs(processor, image if image is not None else probe_image(), prompt, batch_size, device, dtype)
    t, mem = _timed_rounds(model, enc, processor, device, new_tokens, batch_size, warmup, repeats, seed)
    prefill, decode = t["prefill"], t["decode"]
    kernels = Counter(m.kernel for m in model.modules() if isinstance(m, QuantLinear))
    return dict(
        model_bytes=model_nbytes(model), prefill_ms=statistics.median(prefill), prefill_ms_spread=_spread(prefill),
        decode_tok_s=statistics.median(decode), decode_tok_s_spread=_spread(decode),
        infer_peak_bytes=mem.peak, kernel=kernel_label(model), infer_peak_bytes_abs=mem.peak_abs,
        spread="iqr", prefill_ms_all=prefill, decode_tok_s_all=decode,
        prefill_ms_min=min(prefill), prefill_ms_max=max(prefill),
        decode_tok_s_min=min(decode), decode_tok_s_max=max(decode),
        first_token_ms=statistics.median(t["ttft"]),  # generate() call to first logits: set-up + prefill
        decode_step_ms=statistics.median(t["steps"]),  # median single step over all timed rounds (robust to preemption)
        memory_kind=mem.kind, prompt_tokens=int(enc["input_ids"].shape[1]), new_tokens=new_tokens, batch_size=batch_size,
        warmup=warmup, repeats=repeats, device=str(device), dtype=str(dtype).removeprefix("torch."),
        threads=torch.get_num_threads(), kernels=dict(kernels),
    )


def deploy_and_measure(model, processor, quantized: dict | None = None, *, kernel: str = "auto", dtype=None,
                       device=None, **measure_kw) -> dict:
    """What a result row needs about deployment, in one call: deploy `quantized` (module name ->
    QuantizedWeight; None or {} for the full-precision model) into `model` in place with `kernel`
    and `dtype` on `device`, then `model_bytes` (kernels.model_nbytes) and `measure_inference(...,
    **measure_kw)`. Returns the ROW_FIELDS plus the details, and `kernels_used` (name -> kernel)."""
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    used = deploy(model, quantized, kernel, dtype=dtype) if quantized else {}
    return dict(measure_inference(model, processor, device=device, **measure_kw), kernels_used=used)


def _cv(values: list[float]) -> float:
    """Coefficient of variation (sample standard deviation over the mean); 0 for fewer than 2 values."""
    if len(values) < 2 or not statistics.fmean(values):
        return 0.0
    return statistics.stdev(values) / abs(statistics.fmean(values))


def measure_interleaved(models: dict, processor, *, device=None, new_tokens: int = 8, batch_size: int = 1,
                        min_rounds: int = 7, max_rounds: int = 25, cv_target: float = 0.05, warmup: int = 2) -> dict:
    """Time several deployed models (one per deployment format) in rounds that take one repeat of each in
    turn, so that a burst of load on a shared machine hits every format alike instead of one. Rounds go
    on (from `min_rounds` up to `max_rounds`) until every format's prefill and decode have a coefficient
    of variation at or under `cv_target`. Returns, per key, measure_inference's row fields over all its
    rounds plus `prefill_ms_cv`, `decode_tok_s_cv`, `repeats` and `rounds_capped` (True: still noisier
    than the target), or the exception that format raised (the others go on without it)."""
    gc.collect()
    gc.freeze()  # what lives now is not garbage: each round's collection (_PeakMemory) walks only newer objects
    try:
        return _interleaved(models, processor, device, new_tokens, batch_size, min_rounds, max_rounds, cv_target, warmup)
    finally:
        gc.unfreeze()


def _interleaved(models: dict, processor, device, new_tokens: int, batch_size: int, min_rounds: int, max_rounds: int,
                 cv_target: float, warmup: int) -> dict:
    out: dict = {}
    timed = {k: {"prefill": [], "decode": [], "peak": 0, "first": None} for k in models}
    for k, m in models.items():  # warm-up: kernels' first calls, allocator, caches
        try:
            timed[k]["first"] = measure_inference(m, processor, device=device, new_tokens=new_tokens,
                                                  batch_size=batch_size, warmup=warmup, repeats=1)
        except Exception as e:  # noqa: BLE001 - recorded against that format
            out[k] = e
    live = [k for k in models if k not in out]
    rounds = 0
    while live and rounds < max_rounds:
        rounds += 1
        for k in list(live):
            try:
                r = measure_inference(models[k], processor, device=device, new_tokens=new_tokens,
                                      batch_size=batch_size, warmup=0, repeats=1)
            except Exception as e:  # noqa: BLE001
                out[k] = e
                live.remove(k)
                continue
            t = timed[k]
            t["prefill"] += r["prefill_ms_all"]
            t["decode"] += r["decode_tok_s_all"]
            t["peak"] = max(t["peak"], r["infer_peak_bytes"] or 0)
        if rounds >= min_rounds and all(max(_cv(timed[k]["prefill"]), _cv(timed[k]["decode"])) <= cv_target for k in live):
            break
    for k in live:
        t, first = timed[k], timed[k]["first"]
        out[k] = dict(
            model_bytes=first["model_bytes"], kernel=first["kernel"], infer_peak_bytes=max(t["peak"], first["infer_peak_bytes"] or 0),
            prefill_ms=statistics.median(t["prefill"]), prefill_ms_spread=_spread(t["prefill"]),
            decode_tok_s=statistics.median(t["decode"]), decode_tok_s_spread=_spread(t["decode"]),
            prefill_ms_cv=_cv(t["prefill"]), decode_tok_s_cv=_cv(t["decode"]), repeats=len(t["decode"]),
            rounds_capped=max(_cv(t["prefill"]), _cv(t["decode"])) > cv_target,
        )
    return out
