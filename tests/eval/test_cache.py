"""The grid's evaluation cache (`ptqbench.eval.cache`): the same scores, float for float, with and without it,
on every family and across quantized copies sharing one cache; a quantized or hooked vision tower is never
served the full-precision tower's outputs; the memory cap holds; a second scoring computes no tower call."""

import copy

import pytest
import torch

from ptqbench.data import synthvqa as sv
from ptqbench.errors import BadInput
from ptqbench.eval.cache import EvalCache, tensor_digest
from ptqbench.eval import tasks as T
from ptqbench.eval.registry import get_task
from ptqbench.methods.quant import QuantSpec, install_activation_quantizers, quantize_rtn
from ptqbench.models.sources import load_model
from ptqbench.models.testbed import TESTBED_DIR
from ptqbench.models.tiny import TINY_FAMILIES

TASKS = ("synthvqa", "synthvqa-nll")
N, BATCH = 6, 4  # two batches, the second one short


def score_all(model, processor, cache=None, n=N):
    """Every metric's value and per-item outcomes, both tasks."""
    out = {}
    for t in TASKS:
        for m, s in get_task(t).scores(model, processor, n=n, batch_size=BATCH, cache=cache).items():
            out[(t, m)] = (s.value, s.items, s.weights)
    return out


def rtn_copy(model, blocks, bits):
    """A copy of `model` whose linears in `blocks` (a ModuleList path) hold RTN weights (per channel)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for lin in m.get_submodule(blocks).modules():
            if isinstance(lin, torch.nn.Linear):
                lin.weight.copy_(quantize_rtn(lin.weight, QuantSpec(bits=bits, group_size=-1)).dequantize())
    return m


@pytest.fixture(scope="module")
def tiny_qwen():
    return load_model("tiny:qwen2-vl", torch.float32)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_same_scores_and_no_second_tower_call_on_every_family(family):
    lm = load_model(f"tiny:{family}", torch.float32)
    plain = score_all(lm.model, lm.processor)
    cache = EvalCache(lm.model, lm.adapter.vision_tower_path)
    assert score_all(lm.model, lm.processor, cache) == plain
    first = dict(cache.stats)
    assert first["tower_calls"] == 2 and first["tower_hits"] == 2  # the NLL task reuses the generation task's
    assert score_all(copy.deepcopy(lm.model), lm.processor, cache) == plain  # a cell: a copy of the model
    assert cache.stats["tower_calls"] == 2 and cache.stats["tower_hits"] == 6
    assert cache.stats["encode_hits"] - first.get("encode_hits", 0) == 4  # two tasks x two batches


def test_quantized_decoders_share_one_cache_and_keep_their_scores(tiny_qwen):
    """fp, W4, W2 (decoder RTN) and W4A8 (activation quantizers on the decoder linears) on one cache: each scores
    exactly as it does alone, the tower runs only for the first; W2 does score differently (the test can fail)."""
    lm = tiny_qwen
    dec = lm.adapter.decoder_path
    w4, w2 = rtn_copy(lm.model, dec, 4), rtn_copy(lm.model, dec, 2)
    w4a8 = copy.deepcopy(w4)
    install_activation_quantizers([m for m in w4a8.get_submodule(dec).modules() if isinstance(m, torch.nn.Linear)], 8)
    cache = EvalCache(lm.model, lm.adapter.vision_tower_path)
    for model in (lm.model, w4, w2, w4a8):
        assert score_all(model, lm.processor, cache) == score_all(model, lm.processor)
    assert cache.stats["tower_calls"] == 2 and cache.stats["tower_hits"] == 2 + 3 * 4
    assert score_all(w2, lm.processor)[("synthvqa-nll", "nll")] != score_all(lm.model, lm.processor)[("synthvqa-nll", "nll")]


def test_a_quantized_or_hooked_tower_is_never_served_the_full_precision_outputs(tiny_qwen):
    lm = tiny_qwen
    cache = EvalCache(lm.model, lm.adapter.vision_tower_path)
    fp = score_all(lm.model, lm.processor, cache)  # fills the cache
    qv = rtn_copy(lm.model, lm.adapter.vision_blocks_path, 2)
    hooked = copy.deepcopy(lm.model)
    install_activation_quantizers([m for m in hooked.get_submodule(lm.adapter.vision_blocks_path).modules()
                                   if isinstance(m, torch.nn.Linear)], 4)
    for model in (qv, hooked):
        calls = cache.stats["tower_calls"]
        alone = score_all(model, lm.processor)
        assert alone != fp  # the vision tower matters here: a leaked fp output would show
        assert score_all(model, lm.processor, cache) == alone
        assert cache.tower_of(model) is None and cache.stats["tower_calls"] == calls  # not even stored
    # a grid that quantizes the tower builds its cache without one: encodings only
    no_tower = EvalCache(lm.model, None)
    assert score_all(qv, lm.processor, no_tower) == score_all(qv, lm.processor, no_tower) == score_all(qv, lm.processor)
    assert no_tower.stats["tower_hits"] == no_tower.stats["tower_calls"] == 0 and no_tower.stats["encode_hits"] == 4


def test_tower_forward_is_restored(tiny_qwen):
    lm = tiny_qwen
    tower = lm.adapter.vision_tower()
    cache = EvalCache(lm.model, lm.adapter.vision_tower_path)
    with cache.tower_reuse(lm.model):
        assert "forward" in tower.__dict__
    assert "forward" not in tower.__dict__
    with pytest.raises(RuntimeError), cache.tower_reuse(lm.model):
        raise RuntimeError("a failing unit")
    assert "forward" not in tower.__dict__


@pytest.mark.parametrize("cap", [0, 300_000])
def test_memory_cap(tiny_qwen, cap):
    """Nothing beyond the cap is held; what does not fit is recomputed, with the same scores."""
    lm = tiny_qwen
    plain = score_all(lm.model, lm.processor)
    cache = EvalCache(lm.model, lm.adapter.vision_tower_path, max_bytes=cap)
    assert score_all(lm.model, lm.processor, cache) == plain
    assert score_all(lm.model, lm.processor, cache) == plain
    assert cache.nbytes <= cap
    assert cache.stats["encode_over_cap"] + cache.stats["tower_over_cap"] > 0
    if cap == 0:
        assert cache.stats["tower_calls"] == 8 and cache.stats["encode_hits"] == 0  # as without a cache


def test_encodings_are_fresh_copies(tiny_qwen):
    lm = tiny_qwen
    cache = EvalCache()
    items = sv.generate_shared("eval", 2)
    texts = T._prompts(lm.processor, items)
    first = cache.encode(lm.processor, texts, [it.image for it in items], [it.id for it in items], "cpu")
    digest = tensor_digest(first["pixel_values"])
    first["pixel_values"].zero_()  # a caller that writes into its batch changes nothing stored
    again = cache.encode(lm.processor, texts, [it.image for it in items], [it.id for it in items], "cpu")
    assert tensor_digest(again["pixel_values"]) == digest and cache.stats["encode_hits"] == 1


@pytest.mark.skipif(not (TESTBED_DIR / "model.safetensors").is_file(), reason="no testbed checkpoint")
def test_testbed_fp_w4_w2_share_one_cache():
    lm = load_model("testbed", torch.float32)
    dec = lm.adapter.decoder_path
    cache = EvalCache(lm.model, lm.adapter.vision_tower_path)
    for model in (lm.model, rtn_copy(lm.model, dec, 4), rtn_copy(lm.model, dec, 2)):
        assert score_all(model, lm.processor, cache, n=8) == score_all(model, lm.processor, n=8)
    assert cache.stats["tower_calls"] == 2


def test_generate_shared():
    a, b = sv.generate_shared("eval", 5, seed=3), sv.generate_shared("eval", 5, seed=3)
    assert a is not b and all(x is y for x, y in zip(a, b))  # a fresh list of the same items
    fresh = sv.generate("eval", 5, seed=3)
    assert [(it.id, it.question, it.answer, it.image.tobytes()) for it in a] == \
        [(it.id, it.question, it.answer, it.image.tobytes()) for it in fresh]
    with pytest.raises(BadInput, match="n "):
        sv.generate_shared("eval", 0)
    with pytest.raises(BadInput):
        sv.generate_shared("valid", 2)


def test_prompts_and_answer_lengths_are_built_once_per_grid(tiny_qwen, monkeypatch):
    """The text side of a batch (prompts, answers' token counts) is the same for every cell: with a cache the
    second scoring renders no prompt and tokenizes no answer, and the scores are those without a cache."""
    model, proc = tiny_qwen.model, tiny_qwen.processor
    calls = {"prompt": 0, "lengths": 0}
    real_prompt, real_lengths = T.generation_prompt, T.answer_lengths

    def prompt(*a, **k):
        calls["prompt"] += 1
        return real_prompt(*a, **k)

    def lengths(*a, **k):
        calls["lengths"] += 1
        return real_lengths(*a, **k)

    monkeypatch.setattr(T, "generation_prompt", prompt)
    monkeypatch.setattr(T, "answer_lengths", lengths)
    want = score_all(model, proc)
    cache = EvalCache()
    assert score_all(model, proc, cache) == want
    first = dict(calls)
    assert score_all(copy.deepcopy(model), proc, cache) == want
    assert calls == first  # nothing rendered or tokenized again
