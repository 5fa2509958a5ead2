"""lmms-eval bridge: score an in-memory (quantized or not) Hugging Face VLM on lmms-eval tasks.

- :class:`PtqbenchLMM` (model name ``ptqbench``): an ``lmms_eval.api.model.lmms`` wrapping a VLM and
  its processor. ``generate_until`` decodes greedily (prompt through the processor's chat template,
  images from the task's ``doc_to_visual``, ``max_new_tokens``/``until`` from the task's
  ``generation_kwargs``); ``loglikelihood`` is teacher forced (multiple-choice tasks) and, as
  lmms-eval's own models and its ``multiple_choice`` scoring (argmin) expect, returns the mean token
  negative log-likelihood of the continuation.
- :class:`LmmsTask`: the ``evaluate(model, processor, n, batch_size, progress)`` interface of
  :mod:`ptqbench.eval.tasks`, running lmms-eval's own ``simple_evaluate`` on the model.
- ``synthvqa_lmms``: a local lmms-eval task (``lmms_tasks/``) over the SynthVQA eval split. Its
  accuracy equals the built-in ``synthvqa`` task's on the same items by construction: same items,
  prompt, stop tokens, answer normalisation, and the same batches (requests are batched in document
  order with ``batch_size``, as the built-in task batches items, so left padding is identical).

lmms-eval is an optional extra (``pip install 'ptqbench[lmms]'``): this module imports it lazily, so
importing it never needs lmms-eval; using an lmms-eval task without it raises :class:`BadInput`.

Registration: lmms-eval 0.7.3 resolves model names through ``MODEL_REGISTRY_V2``, which at import
reads the entry-point group ``lmms_eval.models`` (payload: a ``ModelManifest`` or a callable
returning one). ptqbench declares ``ptqbench = "ptqbench.eval.lmms:manifest"`` there;
:func:`register` does the same programmatically (for an install whose metadata predates it).
``@register_model`` alone is not enough in 0.7.3. :class:`LmmsTask` needs neither: it passes the
model instance to ``simple_evaluate``.
"""

from __future__ import annotations

import gc
import numbers
from collections.abc import Callable
from pathlib import Path

import torch

from ptqbench.engine.chat import ProgressReporter, encode_left, generation_prompt, stop_and_pad_ids
from ptqbench.errors import BadInput
from ptqbench.eval.tasks import DEFAULT_N, EVAL_SEED, Score, Task, answer_lengths, check_batch_size, check_n, teacher_forced

MODEL_NAME = "ptqbench"
CLASS_PATH = "ptqbench.eval.lmms.PtqbenchLMM"
INSTALL_HINT = "pip install 'ptqbench[lmms]'"
LOCAL_TASKS: tuple[str, ...] = ("synthvqa_lmms",)
DEFAULT_MAX_NEW_TOKENS = 128  # when a generate_until task sets none


def lmms_available() -> bool:
    try:
        import lmms_eval.api.model  # noqa: F401
    except ImportError:
        return False
    return True


def _require_lmms(what: str) -> None:
    if not lmms_available():
        raise BadInput(f"{what} needs lmms-eval, which is not installed; install it with: {INSTALL_HINT}")


# ----------------------------------------------------------------------------- registration


def manifest():
    """Entry point of the group ``lmms_eval.models``: the manifest of the ``ptqbench`` model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


def register() -> None:
    """Register ``ptqbench`` in lmms-eval's model registry (what the entry point does at import)."""
    _require_lmms("the ptqbench lmms-eval model")
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)


# ----------------------------------------------------------------------------- helpers


def _flatten_visuals(visuals) -> list:
    out = []
    for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
        if isinstance(v, (list, tuple)):
            out += _flatten_visuals(v)
        elif v is not None:
            out.append(v)
    from PIL import Image

    for v in out:
        if not isinstance(v, Image.Image):
            raise BadInput(f"visual input of type {type(v).__name__} is not accepted by the ptqbench lmms-eval model; "
                           "accepted: PIL images (image tasks)")
    return out


def _as_int(what: str, value, default: int) -> int:
    if value is None or value == "auto":
        return default
    try:
        v = int(value)
    except (TypeError, ValueError):
        v = 0
    if isinstance(value, bool) or v < 1:
        raise BadInput(f"{what} {value!r} is not accepted; accepted: a positive integer")
    return v


def _gen_settings(gen_kwargs: dict) -> tuple[tuple[str, ...], int]:
    """(stop strings, max_new_tokens) of a task's ``generation_kwargs``."""
    until = gen_kwargs.get("until")
    if until is None:
        until = []
    elif isinstance(until, str):
        until = [until]
    elif not isinstance(until, (list, tuple)):
        raise BadInput(f"generation_kwargs until {until!r} is not accepted; accepted: a string or a list of strings")
    max_new = _as_int("max_new_tokens", gen_kwargs.get("max_new_tokens"), DEFAULT_MAX_NEW_TOKENS)
    return tuple(u for u in until if u), max_new


def _chunks(requests, key: Callable, batch_size: int):
    """Consecutive runs of requests (document order) with equal ``key``, at most batch_size long."""
    chunk, k0 = [], None
    for i, r in enumerate(requests):
        k = key(r)
        if chunk and (k != k0 or len(chunk) == batch_size):
            yield chunk
            chunk = []
        chunk.append(i)
        k0 = k
    if chunk:
        yield chunk


def _cut_at_stops(text: str, until: tuple[str, ...]) -> str:
    for stop in until:
        text = text.split(stop)[0]
    return text


# ----------------------------------------------------------------------------- the lmms-eval model


def _loglikelihood_result_type():
    """What ``loglikelihood`` returns per request: a plain tuple, or one lmms-eval's evaluator keeps.

    lmms-eval 0.7.3's evaluator passes every response through ``unwrap_generation_output``, which
    keeps only strings and ``GenerationResult`` and turns anything else into ``str(x)``: a
    ``(logprob, is_greedy)`` tuple arrives at ``multiple_choice`` scoring as ``"(-3.2, False)"`` and the
    task fails ("too many values to unpack"). Where that is so, results are a ``GenerationResult``
    carrying the tuple, which also unpacks and indexes like one (``lp, greedy = r``).
    """
    try:
        from lmms_eval.api.instance import GenerationResult, unwrap_generation_output
    except ImportError:  # an lmms-eval without the wrapper keeps tuples
        return tuple
    if isinstance(unwrap_generation_output((0.0, True))[0], tuple):
        return tuple

    class LogLikelihood(GenerationResult):
        def __init__(self, pair):
            super().__init__(text=tuple(pair))

        def __iter__(self):
            return iter(self.text)

        def __len__(self):
            return len(self.text)

        def __getitem__(self, i):
            return self.text[i]

    LogLikelihood.__module__ = __name__
    return LogLikelihood


class _PtqbenchLMMCode:
    """The code of :class:`PtqbenchLMM`: an in-memory Hugging Face VLM + processor as an lmms-eval
    model (greedy, batched). `model_class` joins it with lmms-eval's ``lmms`` base class, which can
    only be imported where lmms-eval is installed."""

    is_simple = True
    result_type: type = tuple  # set by model_class (see _loglikelihood_result_type)

    def __init__(self, model=None, processor=None, pretrained: str | None = None, batch_size=16,
                 device: str | None = None, dtype: str = "float32", progress=None,
                 max_batch_size=None, **unknown) -> None:
        super().__init__()
        if unknown:
            raise BadInput(f"model argument(s) {', '.join(sorted(unknown))} not accepted by the ptqbench lmms-eval model; "
                           "accepted: pretrained, batch_size, device, dtype")
        if model is None:  # from the lmms-eval CLI: --model ptqbench --model_args pretrained=testbed
            model, processor = self._load(pretrained, device, dtype)
        elif processor is None:
            raise BadInput("the ptqbench lmms-eval model needs the processor of its model; accepted: processor=<processor>")
        self._model = model
        self.processor = processor
        self.batch_size_per_gpu = _as_int("batch_size", batch_size, 16)
        self.progress = progress
        self.accelerator = None  # single process: keeps lmms-eval from building an Accelerator
        # this bridge's stop ids: see stop_and_pad_ids
        self._eos, self._pad = stop_and_pad_ids(processor.tokenizer, im_end_if_in_vocab=True)

    @staticmethod
    def _load(pretrained: str | None, device: str | None, dtype: str):
        if pretrained is None:
            raise BadInput("the ptqbench lmms-eval model needs a model; accepted: model=<nn.Module> and processor=, "
                           "or pretrained=<testbed | tiny:<family> | checkpoint dir>")
        from ptqbench.models.sources import load_model, resolve_device

        dev = resolve_device(device or "auto")
        loaded = load_model(pretrained, getattr(torch, dtype))
        return loaded.model.to(dev), loaded.processor

    # -- properties lmms-eval reads
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        try:
            return next(self._model.parameters()).device
        except StopIteration:  # pragma: no cover
            return torch.device("cpu")

    def clean(self) -> None:
        """lmms-eval's default drops every nn.Module attribute; the model is the caller's: keep it."""
        gc.collect()

    # -- requests
    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual, doc) -> list:
        return _flatten_visuals(doc_to_visual(doc)) if doc_to_visual else []

    # -- generation
    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        """Greedy decoding (sampling settings of the task are ignored: a benchmark must be deterministic)."""
        self._model.eval()
        args = [r.args for r in requests]
        settings = [_gen_settings(a[1] or {}) for a in args]
        out: list[str | None] = [None] * len(requests)
        bar = ProgressReporter(self.progress, "lmms-eval generate", len(requests))
        for idx in _chunks(args, lambda a: _gen_settings(a[1] or {}), self.batch_size):
            until, max_new = settings[idx[0]]
            texts, images = [], []
            for i in idx:
                ctx, _, doc_to_visual, doc_id, task, split = args[i]
                vis = self._visuals(doc_to_visual, self._doc(task, split, doc_id)) if doc_to_visual else []
                texts.append(generation_prompt(self.processor, ctx, len(vis)))
                images += vis
            enc = encode_left(self.processor, texts, images, self.device)
            gen = self._model.generate(**enc, do_sample=False, max_new_tokens=max_new,
                                       eos_token_id=self._eos, pad_token_id=self._pad)
            decoded = self.tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, text in zip(idx, decoded):
                out[i] = _cut_at_stops(text, until)
            bar.advance(len(idx))
        bar.close()
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise BadInput("multi-round tasks are not accepted by the ptqbench lmms-eval model; "
                       "accepted: generate_until, loglikelihood and multiple_choice tasks")

    # -- teacher-forced log-likelihood
    def _continuation(self, arg) -> tuple[str, str, list]:
        """(prompt, prompt + continuation, images) of one loglikelihood request."""
        ctx, cont, doc_to_visual, doc_id, task, split = arg
        doc = self._doc(task, split, doc_id) if doc_to_visual or callable(cont) else None
        cont = cont(doc) if callable(cont) else cont
        if isinstance(cont, (list, tuple)):
            cont = cont[0]
        vis = self._visuals(doc_to_visual, doc)
        prompt = generation_prompt(self.processor, ctx, len(vis))
        return prompt, prompt + str(cont), vis

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(mean token negative log-likelihood of the continuation, whether greedy decoding yields it).

        lmms-eval's convention, not the log-probability its abstract docstring describes: its own
        models return the loss of ``model(..., labels=...)`` (the mean over continuation tokens), and
        its ``multiple_choice`` scoring picks ``argmin`` accordingly (lmms-eval issue #370). A
        log-probability here would make every multiple-choice task pick the least likely choice.
        Each result unpacks as that pair (see :func:`_loglikelihood_result_type`)."""
        self._model.eval()
        args = [r.args for r in requests]
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = ProgressReporter(self.progress, "lmms-eval loglikelihood", len(requests))
        for idx in _chunks(args, lambda a: None, self.batch_size):
            prompts, fulls, images = [], [], []
            for i in idx:
                prompt, full, vis = self._continuation(args[i])
                prompts.append(prompt)
                fulls.append(full)
                images += vis
            n_cont = answer_lengths(self.tokenizer, prompts, fulls)
            enc = encode_left(self.processor, fulls, images, self.device)
            tok_lp, greedy = teacher_forced(self._model, enc, greedy=True)
            T = enc["input_ids"].shape[1]
            for b, i in enumerate(idx):
                k = n_cont[b]
                # left padding: the continuation is the last k tokens; token t is predicted at t-1.
                out[i] = (float(-tok_lp[b, T - 1 - k:].mean()), bool(greedy[b, T - 1 - k:].all())) if k > 0 else (0.0, True)
            bar.advance(len(idx))
        bar.close()
        return [self.result_type(r) for r in out]


def _build_model_class():
    from lmms_eval.api.model import lmms

    class PtqbenchLMM(_PtqbenchLMMCode, lmms):
        """An in-memory Hugging Face VLM + processor as an lmms-eval model (greedy, batched)."""

        result_type = _loglikelihood_result_type()

    PtqbenchLMM.__module__ = __name__
    PtqbenchLMM.__qualname__ = "PtqbenchLMM"
    return PtqbenchLMM


_CLASS = None


def model_class():
    """The ``PtqbenchLMM`` class (built on first use: it subclasses lmms-eval's ``lmms``)."""
    global _CLASS
    if _CLASS is None:
        _require_lmms("the ptqbench lmms-eval model")
        _CLASS = _build_model_class()
    return _CLASS


def __getattr__(name: str):  # PEP 562: `ptqbench.eval.lmms.PtqbenchLMM`, the manifest's class path
    if name == "PtqbenchLMM":
        return model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- tasks

_DEFAULT_TM = None


def _default_task_manager(verbosity: str = "WARNING"):
    """lmms-eval's TaskManager over its built-in tasks (indexing ~2000 YAML files: built once per process)."""
    global _DEFAULT_TM
    if _DEFAULT_TM is None:
        from loguru import logger
        from lmms_eval.tasks import TaskManager

        logger.disable("lmms_eval")  # indexing logs a DEBUG line per task YAML, whatever `verbosity` says
        try:
            _DEFAULT_TM = TaskManager(verbosity, model_name=MODEL_NAME)
        finally:
            logger.enable("lmms_eval")
    return _DEFAULT_TM


def is_lmms_task(name: str) -> bool:
    """True for a local lmms-eval task of ptqbench, or a task/group lmms-eval knows (when it is installed).

    A local name is an lmms-eval task even without lmms-eval (asking for it then raises the install hint).
    Checking another name indexes lmms-eval's tasks once per process (about a minute on a slow CPU).
    """
    if name in LOCAL_TASKS:
        return True
    if not isinstance(name, str) or not lmms_available():
        return False
    return name in _default_task_manager().all_tasks


def unknown_task_error(name, builtin=()) -> BadInput:
    """The BadInput for a task name that is neither built in nor an lmms-eval task."""
    accepted = ", ".join([*sorted(builtin), *LOCAL_TASKS])
    if not lmms_available():
        return BadInput(f"task {name!r} is not accepted; accepted: {accepted}, or an lmms-eval task name "
                        f"(lmms-eval is not installed; install it with: {INSTALL_HINT})")
    return BadInput(f"task {name!r} is not accepted; accepted: {accepted}, or an lmms-eval task name "
                    "(list them with: lmms-eval --tasks list)")


def _metrics(results: dict, name: str) -> dict[str, float]:
    """``{"acc,none": 0.5, "acc_stderr,none": "N/A", "alias": ...}`` -> ``{"acc": 0.5}``; subtasks prefixed."""
    out: dict[str, float] = {}
    table = results.get("results", {})
    groups = results.get("groups", {})
    for task_name in [name, *sorted(k for k in {*table, *groups} if k != name)]:
        row = {**table.get(task_name, {}), **groups.get(task_name, {})}
        for key, value in row.items():
            metric, _, filt = key.partition(",")
            if "_stderr" in metric or isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            metric = metric if filt in ("", "none") else f"{metric}[{filt}]"
            out[metric if task_name == name else f"{task_name}/{metric}"] = float(value)
    return out


class LmmsTask(Task):
    """An lmms-eval task, run through lmms-eval's evaluator on an in-memory model.

    ``n``: for ``synthvqa_lmms`` the first ``n`` SynthVQA eval items (default DEFAULT_N, as ``synthvqa``);
    for other tasks lmms-eval's ``limit`` (first ``n`` documents; None: the whole task).
    """

    def __init__(self, name: str, seed: int = EVAL_SEED, cache_dir: str | Path | None = None,
                 verbosity: str = "WARNING", builtin=()) -> None:
        if not isinstance(name, str) or not name:
            raise unknown_task_error(name, builtin)
        if name in LOCAL_TASKS:
            _require_lmms(f"task {name!r}")
        elif not is_lmms_task(name):
            raise unknown_task_error(name, builtin)
        self.name = name
        self.description = f"lmms-eval task {name} (lmms-eval's evaluator, ptqbench model)"
        self.seed, self.cache_dir, self.verbosity = seed, cache_dir, verbosity

    def run(self, model, processor, n=None, batch_size: int = 16, progress=None, log_samples: bool = False) -> dict:
        """lmms-eval's full results dict (``results``, and ``samples`` when ``log_samples``)."""
        from lmms_eval.evaluator import simple_evaluate

        if n is not None:
            check_n(n)
        check_batch_size(batch_size)
        if self.name in LOCAL_TASKS:
            from lmms_eval.tasks import TaskManager

            from ptqbench.eval.lmms_tasks.utils import materialize

            folder = materialize(n if n is not None else DEFAULT_N, self.seed, self.cache_dir)
            tm = TaskManager(self.verbosity, include_path=str(folder), include_defaults=False, model_name=MODEL_NAME)
            limit = None
        else:
            tm, limit = _default_task_manager(self.verbosity), n
        model.eval()
        lm = model_class()(model=model, processor=processor, batch_size=batch_size, progress=progress)
        return simple_evaluate(model=lm, tasks=[self.name], task_manager=tm, limit=limit, batch_size=batch_size,
                               bootstrap_iters=0, log_samples=log_samples, verbosity=self.verbosity,
                               random_seed=self.seed, numpy_random_seed=self.seed, torch_random_seed=self.seed,
                               fewshot_random_seed=self.seed, process_docs_parallel=1)

    def scores(self, model, processor, n=None, batch_size=16, progress=None, cache=None) -> dict:
        """lmms-eval's aggregated metrics; their item count is lmms-eval's sample count (no per-item
        outcomes are taken from it, so these scores carry n but no interval). `cache` is not used: lmms-eval
        builds its own batches."""
        results = self.run(model, processor, n, batch_size, progress)
        counts = results.get("n-samples", {}).get(self.name, {})
        n_items = int(counts.get("effective") or counts.get("original") or 0)
        return {m: Score(v, n_items) for m, v in _metrics(results, self.name).items()}

    def identity(self, n=None) -> dict:
        from importlib import metadata

        limit = n if n is not None else (DEFAULT_N if self.name in LOCAL_TASKS else "all")
        return dict(task=self.name, n=limit, seed=self.seed, lmms_eval=metadata.version("lmms_eval"))
