"""The built-in SynthVQA tasks, and what every task is (`Task`, `Score`).

Each task takes any Hugging Face VLM and its processor (prompts go through the processor's chat
template), so the same task scores the embedded testbed and a real checkpoint alike.

- ``synthvqa``: exact-match accuracy (greedy generation, batched, left padding) per family and
  overall on the held-out SynthVQA eval split.
- ``synthvqa-nll``: mean answer-token negative log-likelihood (teacher forced) on the same items.

Tasks are looked up by name through :func:`ptqbench.eval.registry.get_task`.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from ptqbench.data import synthvqa as sv
from ptqbench.data.synthvqa import INSTRUCTION  # defined with the data; importable from here too
from ptqbench.eval.cache import EvalCache
from ptqbench.engine.chat import ProgressReporter, encode_left, generation_prompt, stop_and_pad_ids, user_turn
from ptqbench.errors import BadInput

DEFAULT_N = 200  # 33 per family; the default grid (19 cells x 2 tasks) must fit 10 minutes on 2 cores
EVAL_SEED = sv.DEFAULT_SEED["eval"]


def user_text(question: str) -> str:
    return f"{question}{INSTRUCTION}"


def messages_for(question: str, with_image: bool = True) -> list[dict]:
    return [user_turn(user_text(question), 1 if with_image else 0)]


def normalize(text: str) -> str:
    """strip, lowercase, and drop trailing punctuation ("Red." -> "red")."""
    return text.strip().lower().rstrip(string.punctuation + " ").strip()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def check_n(n):
    if n is None:
        return DEFAULT_N
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise BadInput(f"n {n!r} is not accepted; accepted: a positive integer")
    return n


def check_batch_size(batch_size):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise BadInput(f"batch_size {batch_size!r} is not accepted; accepted: a positive integer")
    return batch_size


def _prompts(processor, items, cache: EvalCache | None = None) -> list[str]:
    def make():
        return [generation_prompt(processor, user_text(it.question), 1) for it in items]

    return make() if cache is None else cache.text(processor, ("prompts", tuple(it.question for it in items)), make)


def _encode(processor, texts, images, device):
    return encode_left(processor, texts, images, device)


def _encode_items(processor, texts, chunk, device, cache: EvalCache | None = None):
    """The left-padded batch of `texts` over the images of the items `chunk` (built once per grid with a cache)."""
    images = [it.image for it in chunk]
    if cache is None:
        return _encode(processor, texts, images, device)
    return cache.encode(processor, texts, images, tuple(it.id for it in chunk), device)


def _tower_reuse(cache: EvalCache | None, model):
    return cache.tower_reuse(model) if cache is not None else nullcontext()


def answer_lengths(tokenizer, prompts: list[str], fulls: list[str]) -> list[int]:
    """Tokens each full text adds to its prompt, counted on the text alone (image placeholders are
    unexpanded there, and equal in both)."""
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    f_ids = tokenizer(fulls, add_special_tokens=False)["input_ids"]
    return [len(f) - len(p) for p, f in zip(p_ids, f_ids)]


def teacher_forced(model, enc: dict, greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log p of every next token given the ones before, (B, T-1); with `greedy`, whether each is also
    the most likely one). Left padding puts a continuation of k tokens at [:, T-1-k:]."""
    logits = model(**enc).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    tgt = enc["input_ids"][:, 1:]
    tok_lp = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    return tok_lp, (logp.argmax(-1) == tgt) if greedy else None


@dataclass
class Score:
    """One metric of a task with what its uncertainty needs: the per-item outcomes in item order.

    kind "proportion": items are 0/1 (value = their mean); kind "mean": value = sum(items) / sum(weights)
    (weights: e.g. each item's answer tokens, for a token-weighted NLL; None = plain mean). A task that
    cannot give per-item outcomes leaves `items` empty: its score is shown with n but no interval."""

    value: float
    n: int
    kind: str = "mean"
    items: list[float] | None = None
    weights: list[float] | None = None


class Task:
    name: str = ""
    description: str = ""

    def scores(self, model, processor, n: int | None = None, batch_size: int = 16,
               progress: Callable[[int, int], None] | None = None, cache: EvalCache | None = None) -> dict[str, Score]:
        """Metric name -> Score. ``progress``: None, a callable ``(done, total)`` or a rich Progress. ``cache``:
        the grid's `EvalCache` (encodings and full-precision tower outputs reused; same scores), or None."""
        raise NotImplementedError

    def evaluate(self, model, processor, n: int | None = None, batch_size: int = 16,
                 progress: Callable[[int, int], None] | None = None, cache: EvalCache | None = None) -> dict[str, float]:
        """Metric name -> value."""
        return {m: s.value for m, s in self.scores(model, processor, n, batch_size, progress, cache=cache).items()}

    def identity(self, n: int | None = None) -> dict:
        """Everything besides the model that decides this task's numbers: a stored score is keyed by it."""
        return dict(task=self.name, n=check_n(n), seed=self.seed)


class SynthVQAAccuracy(Task):
    name = "synthvqa"
    description = "SynthVQA exact-match accuracy (greedy), per family and overall"

    def __init__(self, seed: int = EVAL_SEED, max_new_tokens: int = 4):  # answers: one word + <|im_end|>
        self.seed = seed
        self.max_new_tokens = max_new_tokens

    def identity(self, n=None) -> dict:
        return dict(super().identity(n), max_new_tokens=self.max_new_tokens, decoding="greedy")

    @torch.no_grad()
    def predict(self, model, processor, items, batch_size: int = 16, progress=None, cache=None) -> list[str]:
        seed_everything(self.seed)
        device = _model_device(model)
        tok = processor.tokenizer
        eos, pad = stop_and_pad_ids(tok, im_end_if_in_vocab=False)  # this task's stop ids: see stop_and_pad_ids
        preds: list[str] = []
        bar = ProgressReporter(progress, self.name, len(items))
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            enc = _encode_items(processor, _prompts(processor, chunk, cache), chunk, device, cache)
            out = model.generate(**enc, do_sample=False, max_new_tokens=self.max_new_tokens,
                                 eos_token_id=eos, pad_token_id=pad)
            new = out[:, enc["input_ids"].shape[1]:]
            preds += tok.batch_decode(new, skip_special_tokens=True)
            bar.advance(len(chunk))
        bar.close()
        return preds

    def scores(self, model, processor, n=None, batch_size=16, progress=None, cache=None):
        n, batch_size = check_n(n), check_batch_size(batch_size)
        model.eval()
        items = sv.generate_shared("eval", n, seed=self.seed)
        with _tower_reuse(cache, model):
            preds = self.predict(model, processor, items, batch_size, progress, cache)
        hits = [float(normalize(p) == normalize(it.answer)) for it, p in zip(items, preds)]
        res = {"acc": _proportion(hits)}
        for f in sv.FAMILIES:
            fam = [h for h, it in zip(hits, items) if it.family == f]
            if fam:
                res[f"acc/{f}"] = _proportion(fam)
        return res


class SynthVQANLL(Task):
    name = "synthvqa-nll"
    description = "SynthVQA mean answer-token negative log-likelihood (teacher forced)"

    def __init__(self, seed: int = EVAL_SEED):
        self.seed = seed

    @torch.no_grad()
    def scores(self, model, processor, n=None, batch_size=16, progress=None, cache=None):
        n, batch_size = check_n(n), check_batch_size(batch_size)
        seed_everything(self.seed)
        model.eval()
        items = sv.generate_shared("eval", n, seed=self.seed)
        with _tower_reuse(cache, model):
            nll, tokens = self.item_nlls(model, processor, items, batch_size, progress, cache)
        res = {"nll": _ratio(nll, tokens)}
        family_sums = []
        for f in sv.FAMILIES:
            idx = [i for i, it in enumerate(items) if it.family == f and tokens[i]]
            if idx:
                res[f"nll/{f}"] = _ratio([nll[i] for i in idx], [tokens[i] for i in idx])
                family_sums.append(sum(nll[i] for i in idx))
        if sum(tokens):  # summed family by family, as the figures published before per-item scores were
            res["nll"].value = sum(family_sums) / sum(tokens)
        return res

    @torch.no_grad()
    def item_nlls(self, model, processor, items, batch_size=16, progress=None, cache=None):
        """(the summed -log p of each item's answer, its token count), in item order."""
        device = _model_device(model)
        end = processor.tokenizer.eos_token or ""
        nll, tokens = [], []
        bar = ProgressReporter(progress, self.name, len(items))
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            prompts = _prompts(processor, chunk, cache)
            # the answer turn as the model must produce it: the word and the end-of-turn token that stops
            # generation (a model that answers right but cannot stop fails exact match, so it counts here)
            full = [p + it.answer + end for p, it in zip(prompts, chunk)]
            n_ans = (answer_lengths(processor.tokenizer, prompts, full) if cache is None else
                     cache.text(processor, ("answer_lengths", tuple(prompts), tuple(full)),
                                lambda: answer_lengths(processor.tokenizer, prompts, full)))
            enc = _encode_items(processor, full, chunk, device, cache)
            tok_lp, _ = teacher_forced(model, enc)  # (B, T-1)
            T = enc["input_ids"].shape[1]
            for b, it in enumerate(chunk):
                k = max(n_ans[b], 0)
                # left padding: the answer is the last k tokens; token t is predicted at t-1.
                nll.append(float(-tok_lp[b, T - 1 - k:].sum()) if k else 0.0)
                tokens.append(float(k))
            bar.advance(len(chunk))
        bar.close()
        return nll, tokens


def _proportion(hits: list[float]) -> Score:
    return Score(float(np.mean(hits)), len(hits), "proportion", hits)


def _ratio(values: list[float], weights: list[float]) -> Score:
    """A token-weighted mean (sum over items / their tokens), n = the items with tokens."""
    total = sum(weights)
    return Score(sum(values) / total if total else math.nan, sum(1 for w in weights if w), "mean", values, weights)
