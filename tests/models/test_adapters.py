"""Adapters on the tiny random-weight models of every supported family: module paths, image tokens,
capture + layer-by-layer replay exactness (fp32, padded batches), quantization groups."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn

from ptqbench.errors import BadInput
from ptqbench.methods.scale_search import scale_groups
from ptqbench.models.adapters import ADAPTERS, adapter_for, supported_model_types
from ptqbench.models.tiny import TINY_FAMILIES, build_tiny, tiny_batch, tiny_inputs

ATOL = 1e-5

DECODER_GROUPS = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj"],
    ["mlp.down_proj"],
]


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def tiny(request):
    model, processor = build_tiny(request.param)
    return request.param, model, processor


def _batch(processor, padding_side="right", n=2):
    return tiny_inputs(processor, tiny_batch(processor, n=n), padding_side=padding_side)


def _assert_close(actual, expected, what):
    assert actual.shape == expected.shape, what
    diff = (actual - expected).abs().max().item()
    assert diff <= ATOL, f"{what}: max abs diff {diff:.3g} > {ATOL}"


def test_every_tiny_family_has_an_adapter():
    families = {a.family for a in ADAPTERS}
    assert set(TINY_FAMILIES) <= families


def test_paths_resolve(tiny):
    family, model, _ = tiny
    ad = adapter_for(model)
    assert ad.family == family
    layers = ad.decoder_layers()
    assert isinstance(layers, nn.ModuleList) and len(layers) == model.config.get_text_config().num_hidden_layers
    assert isinstance(ad.vision_blocks(), nn.ModuleList) and len(ad.vision_blocks()) >= 1
    assert isinstance(ad.lm_head(), nn.Linear)
    assert ad.lm_head().out_features == model.config.get_text_config().vocab_size
    norm = ad.final_norm()
    assert norm.weight.shape == (model.config.get_text_config().hidden_size,)
    projectors = ad.projectors()
    assert projectors and all(any(isinstance(m, nn.Linear) for m in p.modules()) for p in projectors)
    # the projector is not a part of the decoder
    decoder_ids = {id(m) for m in layers.modules()}
    assert all(id(p) not in decoder_ids for p in projectors)
    if family == "qwen3-vl":
        assert len(projectors) == 2  # merger + deepstack mergers


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_replay_reproduces_hidden_states(tiny, padding_side):
    family, model, processor = tiny
    ad = adapter_for(model)
    inputs = _batch(processor, padding_side)
    mask = inputs["attention_mask"]
    lengths = mask.sum(1)
    assert lengths[0] != lengths[1], "the two samples should have different lengths"
    short = int(lengths.argmin())
    pad_col = 0 if padding_side == "left" else -1
    assert mask[short, pad_col] == 0, f"expected {padding_side} padding"

    with torch.no_grad():
        out = model(**inputs, **ad.extra_model_inputs(inputs), output_hidden_states=True, use_cache=False)
        hs = out.hidden_states
        n = len(ad.decoder_layers())
        assert len(hs) == n + 1

        hidden, kwargs, extras = ad.capture(inputs)
        _assert_close(hidden, hs[0], f"{family}: captured layer-0 input")

        outs: list[torch.Tensor] = []
        last = ad.replay(hidden, kwargs, extras, collect=lambda i, h: outs.append(h))
        assert len(outs) == n
        for i in range(n - 1):
            # the model records each layer's own output; Qwen3-VL adds deepstack features afterwards
            expected = ad.after_layer(i, hs[i + 1], extras)
            _assert_close(outs[i], expected, f"{family}: output of decoder layer {i}")
        _assert_close(ad.final_norm()(last), hs[-1], f"{family}: final norm of the last layer")
        _assert_close(ad.logits(last), out.logits, f"{family}: logits")

        # partial replay and re-entry from a captured layer
        mid = ad.replay(hidden, kwargs, extras, upto=1)
        _assert_close(mid, outs[0], f"{family}: replay upto=1")


def test_qwen3_deepstack_is_replayed():
    model, processor = build_tiny("qwen3-vl")
    ad = adapter_for(model)
    hidden, kwargs, extras = ad.capture(_batch(processor))
    embeds = extras["deepstack_visual_embeds"]
    assert embeds is not None and len(embeds) == len(model.config.vision_config.deepstack_visual_indexes)
    with torch.no_grad():
        h0 = ad.run_layer(ad.decoder_layers()[0], hidden, kwargs)
        assert not torch.equal(ad.after_layer(0, h0, extras), h0)
        assert torch.equal(ad.after_layer(len(embeds), h0, extras), h0)


def test_attention_residual_matches_layer(tiny):
    family, model, processor = tiny
    ad = adapter_for(model)
    hidden, kwargs, _ = ad.capture(_batch(processor, "left"))
    block = ad.decoder_layers()[0]
    with torch.no_grad():
        attn = ad.decoder_layout.attention_residual(block, hidden, kwargs)
        full = attn + block.mlp(block.post_attention_layernorm(attn))
        _assert_close(full, ad.run_layer(block, hidden, kwargs), f"{family}: attention_residual + mlp")


def test_image_tokens(tiny):
    family, model, processor = tiny
    ad = adapter_for(model)
    image_id = ad.image_token_id()
    assert image_id == processor.image_token_id
    assert image_id in ad.vision_token_ids()
    inputs = _batch(processor)
    counts = ad.image_token_counts(inputs["input_ids"])
    assert all(4 <= c <= 128 for c in counts), counts

    # the number of image placeholders equals the number of image feature vectors the model produces
    inner = model.model
    seen: list[int] = []
    original = inner.get_image_features

    def counting(*args, **kwargs):
        res = original(*args, **kwargs)
        feats = res.pooler_output
        feats = feats if isinstance(feats, (list, tuple)) else [feats]
        seen.append(sum(f.reshape(-1, f.shape[-1]).shape[0] for f in feats))
        return res

    inner.get_image_features = counting
    try:
        with torch.no_grad():
            model(**inputs, **ad.extra_model_inputs(inputs), use_cache=False)
    finally:
        del inner.get_image_features
    assert seen == [sum(counts)]

    if family.startswith("qwen"):
        merge = processor.image_processor.merge_size ** 2
        assert counts == (inputs["image_grid_thw"].prod(-1) // merge).tolist()
    elif family == "llava":
        assert counts == [16, 16]
    elif family == "internvl":
        assert sum(counts) == 16 * inputs["pixel_values"].shape[0]


def _execution_order(block: nn.Module, run) -> list[str]:
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, a, n=name: order.append(n))
               for name, m in block.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return order


def _check_groups_follow_execution(groups: list[list[str]], order: list[str], names: list[str]):
    flat = [n for g in groups for n in g]
    assert sorted(flat) == sorted(names), "every linear in exactly one group"
    index = {n: gi for gi, g in enumerate(groups) for n in g}
    seq = [index[n] for n in order if n in index]
    assert seq == sorted(seq), f"groups {groups} out of execution order {order}"


def test_decoder_groups(tiny):
    family, model, processor = tiny
    ad = adapter_for(model)
    block = ad.decoder_layers()[0]
    names = list(ad.block_linears(block))
    modules = dict(block.named_modules())
    assert ad.sequential_groups(names) == DECODER_GROUPS
    assert ad.sequential_groups(sorted(names)) == [sorted(g) for g in DECODER_GROUPS]

    hidden, kwargs, _ = ad.capture(_batch(processor))
    order = _execution_order(block, lambda: ad.run_layer(block, hidden, kwargs))
    _check_groups_follow_execution(ad.sequential_groups(names), order, names)

    groups = scale_groups(ad.decoder_layout, block)
    for g in groups:
        assert modules[g["prev_name"]] is g["prev"]
        assert g["inspect"] in modules
        assert all(isinstance(modules[n], nn.Linear) for n in g["linears"])
    prevs = [g["prev_name"] for g in groups]
    attn = block.self_attn
    # the tiny decoders use grouped-query attention, so v_proj and o_proj differ and v->o is skipped
    assert attn.v_proj.weight.shape != attn.o_proj.weight.shape
    assert prevs == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]
    assert [g["linears"] for g in groups] == [DECODER_GROUPS[0], DECODER_GROUPS[2], DECODER_GROUPS[3]]


def test_scale_groups_include_v_to_o_without_gqa():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model, _ = build_tiny("llava")
    ad = adapter_for(model)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
    block = LlamaDecoderLayer(cfg, 0)
    groups = scale_groups(ad.decoder_layout, block)
    assert [g["prev_name"] for g in groups] == [
        "input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"]
    assert groups[1]["linears"] == ["self_attn.o_proj"] and groups[1]["prev"] is block.self_attn.v_proj


def test_vision_groups_and_replay(tiny):
    family, model, processor = tiny
    ad = adapter_for(model)
    inputs = _batch(processor)
    blocks = ad.vision_blocks()

    reference: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda m, a, o: reference.append(o[0] if isinstance(o, tuple) else o))
               for b in blocks]
    try:
        with torch.no_grad():
            model(**inputs, **ad.extra_model_inputs(inputs), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    assert len(reference) == len(blocks)

    hidden, calls = ad.capture_vision(inputs)
    outs: list[torch.Tensor] = []
    with torch.no_grad():
        ad.replay_vision(hidden, calls, collect=lambda i, h: outs.append(h))
    for i, (o, r) in enumerate(zip(outs, reference)):
        _assert_close(o, r, f"{family}: vision block {i}")

    block = blocks[0]
    names = list(ad.block_linears(block))
    groups = ad.sequential_groups(names)
    assert len(groups) == 4, groups  # qkv -> out proj -> fc1 (gate,up) -> fc2 (down)
    args, kwargs = calls[0]
    order = _execution_order(block, lambda: block(hidden, *args, **kwargs))
    _check_groups_follow_execution(groups, order, names)


def test_smolvlm_uses_the_idefics3_adapter():
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    idefics, processor = build_tiny("idefics3")
    cfg = idefics.config
    vision = {k: v for k, v in cfg.vision_config.to_dict().items() if k != "model_type"}
    text = cfg.text_config.to_dict()
    torch.manual_seed(0)
    model = SmolVLMForConditionalGeneration(SmolVLMConfig(
        vision_config=vision, text_config=text, image_token_id=cfg.image_token_id, scale_factor=cfg.scale_factor,
    )).eval()
    ad = adapter_for(model)
    assert ad.family == "idefics3"
    inputs = _batch(processor, "left")
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, use_cache=False)
        hidden, kwargs, extras = ad.capture(inputs)
        outs: list[torch.Tensor] = []
        last = ad.replay(hidden, kwargs, extras, collect=lambda i, h: outs.append(h))
    for i in range(len(outs) - 1):
        _assert_close(outs[i], out.hidden_states[i + 1], f"smolvlm: decoder layer {i}")
    _assert_close(ad.logits(last), out.logits, "smolvlm: logits")
    assert len(ad.vision_blocks()) == 2 and ad.projectors()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_unknown_architecture_is_bad_input(kind):
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2))
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(BadInput) as err:
        adapter_for(model)
    msg = str(err.value)
    assert repr(kind) in msg
    for t in supported_model_types():
        assert t in msg


def test_supported_model_types():
    types = supported_model_types()
    for t in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "llava_onevision", "idefics3", "smolvlm", "internvl"):
        assert t in types


def test_non_full_attention_layers_are_refused(tiny):
    family, model, _ = tiny
    text = model.config.get_text_config()
    had = "layer_types" in text.__dict__
    saved = getattr(text, "layer_types", None)
    n = text.num_hidden_layers
    text.layer_types = ["full_attention"] + ["sliding_attention"] * (n - 1)
    try:
        with pytest.raises(BadInput) as err:
            adapter_for(model)
        assert family in str(err.value) and "sliding_attention" in str(err.value)
        text.layer_types = ["full_attention"] * n
        adapter_for(model)  # all full attention: accepted
    finally:
        if had:
            text.layer_types = saved
        else:
            del text.layer_types
