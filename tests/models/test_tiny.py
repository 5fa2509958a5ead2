"""Tiny random-weight VLMs and their locally built processors."""

from __future__ import annotations

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image

from ptqbench.errors import BadInput
from ptqbench.models.tiny import (TINY_FAMILIES, build_tiny, build_tokenizer, chat_messages, tiny_batch,
                                   tiny_inputs)

EXPECTED = {"qwen2-vl", "qwen2.5-vl", "qwen3-vl", "llava", "llava-onevision", "idefics3", "internvl"}


def test_families():
    assert set(TINY_FAMILIES) == EXPECTED


def test_unknown_family_is_bad_input():
    with pytest.raises(BadInput) as err:
        build_tiny("gemma3")
    msg = str(err.value)
    assert "'gemma3'" in msg
    for f in TINY_FAMILIES:
        assert f in msg


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def tiny(request):
    build_tiny(request.param)  # warm imports so the timing below measures the build itself
    t = time.perf_counter()
    model, processor = build_tiny(request.param)
    return request.param, model, processor, time.perf_counter() - t


def test_model_is_tiny_fp32_eval(tiny):
    family, model, processor, seconds = tiny
    assert seconds < 5, f"{family}: build_tiny took {seconds:.1f}s"
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    text = model.config.get_text_config()
    assert 64 <= text.hidden_size <= 128 and 2 <= text.num_hidden_layers <= 3
    assert text.num_key_value_heads < text.num_attention_heads  # GQA
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert text.vocab_size == len(processor.tokenizer)
    assert model.name_or_path == f"tiny:{family}"


def test_seeded_and_global_rng_untouched(tiny):
    family = tiny[0]
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a, _ = build_tiny(family, seed=0)
    after = torch.rand(3)
    assert torch.equal(before, after), "build_tiny must not consume the global RNG"
    b, _ = build_tiny(family, seed=0)
    c, _ = build_tiny(family, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_chat_template_round_trip(tiny):
    family, _, processor, _ = tiny
    tok = processor.tokenizer
    msgs = chat_messages("What color is the square?", "It is red.", system="You are a helpful assistant.")
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    for piece in ("What color is the square?", "It is red.", "You are a helpful assistant."):
        assert piece in text
    assert text.index("helpful") < text.index("What color") < text.index("It is red")
    prompt = processor.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert "It is red." not in prompt and text.startswith(prompt)  # the answer follows the generation prompt
    # plain string content works too
    plain = processor.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                          add_generation_prompt=True)
    assert "hi" in plain
    # the tokenizer round-trips the rendered chat (special tokens stay single tokens)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert ids.count(processor.image_token_id) == 1  # one placeholder before the processor expands it
    # the prompt's tokens are a prefix of the full chat's tokens (answer masks count tokens after it)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids


def test_processor_batch(tiny):
    family, model, processor, _ = tiny
    samples = tiny_batch(processor, n=3, seed=1)
    assert len(samples) == 3
    for img, q, a in samples:
        assert isinstance(img, Image.Image) and img.mode == "RGB" and q and a
    for side in ("left", "right"):
        inputs = tiny_inputs(processor, samples, padding_side=side)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        assert ids.shape == mask.shape and ids.shape[0] == 3
        assert (mask.sum(1) < ids.shape[1]).any()  # padded
        pad_col = 0 if side == "left" else -1
        assert (ids[mask[:, pad_col] == 0, pad_col] == processor.tokenizer.pad_token_id).all()
        counts = (ids == processor.image_token_id).sum(1)
        assert ((counts >= 4) & (counts <= 128)).all(), counts
        decoded = processor.tokenizer.decode(ids[1][mask[1].bool()])
        assert samples[1][1] in decoded and samples[1][2] in decoded
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape == (*ids.shape, model.config.get_text_config().vocab_size)
    assert torch.isfinite(out.logits[mask.bool()]).all()


def test_generate_and_reload(tiny, tmp_path):
    from transformers import AutoProcessor

    family, model, processor, _ = tiny
    samples = tiny_batch(processor, n=2)
    texts = [processor.apply_chat_template(chat_messages(q), tokenize=False, add_generation_prompt=True)
             for _, q, _ in samples]
    inputs = processor(text=texts, images=[[img] for img, _, _ in samples], padding=True,
                       padding_side="left", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)

    processor.save_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path)
    assert type(again) is type(processor)
    a, b = tiny_inputs(processor, samples), tiny_inputs(again, samples)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_batch_is_deterministic():
    a, b, c = tiny_batch(None, n=4, seed=0), tiny_batch(None, n=4, seed=0), tiny_batch(None, n=4, seed=1)
    assert [(x.tobytes(), q, ans) for x, q, ans in a] == [(x.tobytes(), q, ans) for x, q, ans in b]
    assert [x.tobytes() for x, _, _ in a] != [x.tobytes() for x, _, _ in c]
    assert len({x.size for x, _, _ in a}) > 1  # varied image sizes


def test_tokenizer_is_cached_and_independent():
    t1, t2 = build_tokenizer("llava"), build_tokenizer("llava")
    t1.add_tokens(["<extra_only_in_t1>"])
    assert len(t2) == len(t1) - 1  # each call gets its own tokenizer object
