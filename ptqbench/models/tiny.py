"""Tiny random-weight VLMs built locally (no download), one per supported family.

`build_tiny(family)` returns `(model, processor)`: a small fp32 model built from a config (3 decoder
layers, hidden 64, grouped-query attention, a 2-block vision tower) and a processor assembled from
parts: a byte-level BPE tokenizer trained in-process on a fixed corpus, carrying the family's special
and image tokens and a chat template with system/user/assistant turns, plus the family's own image
processor set to small images. Tiny and real checkpoints are therefore driven by the same calibration
code: `processor.apply_chat_template(messages, tokenize=False, ...)`, then
`processor(text=[...], images=[...], padding=True, return_tensors="pt")`.

Image tokens per image (the first two `tiny_batch` images, 112x112 and 160x96, get the counts in brackets):
- qwen2-vl / qwen2.5-vl: 16-64 (patch 14, merge 2, 112^2..224^2 pixels) [16, 18]; qwen3-vl: the same
  with patch 16 (128^2..256^2 pixels) [16, 24].
- llava: 16 (CLIP 32x32, patch 8, CLS dropped by the "default" strategy) [16, 16].
- llava-onevision: anyres over 32x32 tiles (pinpoints 32x32, 32x64, 64x32): 16 base tokens plus the
  unpadded tile grid with one newline token per row [36, 44].
- idefics3: image splitting on, 64x64 crops, 4 tokens per crop (patch 16, scale factor 2), up to 2x2
  crops plus the global image, framed by `<fake_token_around_image>`/`<row_i_col_j>` tokens [20, 20].
- internvl: 64x64 tiles, 16 tokens per tile (patch 8, downsample 0.5), up to 2 tiles plus a
  thumbnail, framed by `<img>`/`</img>` [16, 48].
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ptqbench.errors import BadInput

# Decoder shape shared by all families (text side): small but with GQA (4 query heads, 2 KV heads).
TEXT_HIDDEN = 64
TEXT_INTERMEDIATE = 128
TEXT_LAYERS = 3
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
VISION_HIDDEN = 32
VISION_INTERMEDIATE = 64
VISION_LAYERS = 2
VISION_HEADS = 2

_WORDS_COLORS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple", "gray", "pink"]
_WORDS_SHAPES = ["circle", "square", "triangle", "line", "dot", "stripe", "star", "cross"]

_CORPUS = [
    "You are a helpful assistant that answers questions about images.",
    "What is shown in this image? Describe the picture in one sentence.",
    "How many objects are there in the image? There are two objects.",
    "What color is the large shape on the left side of the picture?",
    "The image shows a red circle next to a blue square on a white background.",
    "Is there any text in the image? No, there is no text.",
    "Answer with a single word. Yes. No. Maybe.",
    "Describe the scene: a small green triangle above a yellow line.",
    "Which shape is bigger, the circle or the square? The circle is bigger.",
    "Count the stripes and dots in the picture, then answer with a number: 0 1 2 3 4 5 6 7 8 9 10.",
    "The quick brown fox jumps over the lazy dog. A photo of a cat, a dog and a bird.",
    "Where is the star located? It is in the top right corner of the image.",
    "What is the main color of the background? The background is mostly gray.",
] + [f"A {c} {s} is in the {p} of the image." for c in _WORDS_COLORS for s in _WORDS_SHAPES
     for p in ("center", "top", "bottom")]

_BPE_VOCAB = 600  # byte alphabet (256) + merges


@functools.lru_cache(maxsize=1)
def _base_tokenizer_json() -> str:
    """Train the shared byte-level BPE once per process (a few ms) and keep its JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=_BPE_VOCAB, special_tokens=[], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return tok.to_str()


# ---- chat templates ---------------------------------------------------------------------------

def _chat_template(prefix: dict[str, str], suffix: dict[str, str], image: str, generation: str,
                   bos: str = "") -> str:
    """A Jinja chat template with system/user/assistant turns; content may be a string or a list of
    {"type": "image"} / {"type": "text", "text": ...} items (images render as `image`)."""
    j = json.dumps
    return (
        "{%- set prefix = " + j(prefix) + " -%}"
        "{%- set suffix = " + j(suffix) + " -%}"
        "{{- " + j(bos) + " -}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] not in prefix -%}"
        "{{- raise_exception('unknown role ' + message['role']) -}}"
        "{%- endif -%}"
        "{{- prefix[message['role']] -}}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}{%- for item in message['content'] -%}"
        "{%- if item['type'] in ('image', 'image_url') -%}{{- " + j(image) + " -}}"
        "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        "{{- suffix[message['role']] -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- " + j(generation) + " -}}{%- endif -%}"
    )


def _chatml(image: str) -> str:
    roles = ("system", "user", "assistant")
    return _chat_template({r: f"<|im_start|>{r}\n" for r in roles}, {r: "<|im_end|>\n" for r in roles},
                          image, "<|im_start|>assistant\n")


_CHATML_TOKENS = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")


# ---- family specs ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Family:
    name: str
    named_tokens: dict[str, str]  # eos/pad/bos tokens
    extra_tokens: Any  # list of extra special tokens, or dict name -> token (becomes tokenizer attrs)
    chat_template: str
    build: Callable[[Any, int], tuple[Any, Any]]  # (tokenizer, vocab size) -> (model, processor)
    padding_side: str = "right"  # tokenizer default; callers may pass padding_side= to the processor


def _text_llama(tok, vocab: int, **kw) -> dict:
    return dict(model_type="llama", vocab_size=vocab, hidden_size=TEXT_HIDDEN, intermediate_size=TEXT_INTERMEDIATE,
                num_hidden_layers=TEXT_LAYERS, num_attention_heads=TEXT_HEADS, num_key_value_heads=TEXT_KV_HEADS,
                max_position_embeddings=2048, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                bos_token_id=tok.bos_token_id, tie_word_embeddings=False, **kw)


def _text_qwen2(tok, vocab: int, **kw) -> dict:
    d = _text_llama(tok, vocab, **kw)
    d["model_type"] = "qwen2"
    return d


def _ids(tok, *tokens: str) -> list[int]:
    out = [tok.convert_tokens_to_ids(t) for t in tokens]
    if any(i is None or i == tok.unk_token_id for i in out):
        raise RuntimeError(f"tiny tokenizer lacks one of {tokens}")
    return out


def _qwen_vl(kind: str):
    def build(tok, vocab):
        from transformers import Qwen2VLImageProcessor

        image_id, video_id, vs_id, ve_id = _ids(tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                "<|vision_end|>")
        text = dict(vocab_size=vocab, hidden_size=TEXT_HIDDEN, intermediate_size=TEXT_INTERMEDIATE,
                    num_hidden_layers=TEXT_LAYERS, num_attention_heads=TEXT_HEADS,
                    num_key_value_heads=TEXT_KV_HEADS, max_position_embeddings=2048,
                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
        tokens = dict(image_token_id=image_id, video_token_id=video_id, vision_start_token_id=vs_id,
                      vision_end_token_id=ve_id, tie_word_embeddings=False)
        head_dim = TEXT_HIDDEN // TEXT_HEADS
        mrope = [head_dim // 2 - 2 * (head_dim // 6), head_dim // 6, head_dim // 6]  # sums to head_dim/2
        patch = 16 if kind == "qwen3" else 14
        if kind == "qwen2":
            from transformers import Qwen2VLConfig as Cfg, Qwen2VLForConditionalGeneration as Model
            from transformers import Qwen2VLProcessor as Proc, Qwen2VLVideoProcessor as VProc

            text["rope_parameters"] = dict(rope_type="default", rope_theta=10000.0, mrope_section=mrope)
            vision = dict(depth=VISION_LAYERS, embed_dim=VISION_HIDDEN, hidden_size=TEXT_HIDDEN, mlp_ratio=2,
                          num_heads=VISION_HEADS, patch_size=patch, spatial_merge_size=2, temporal_patch_size=2)
        elif kind == "qwen2.5":
            from transformers import Qwen2_5_VLConfig as Cfg, Qwen2_5_VLForConditionalGeneration as Model
            from transformers import Qwen2_5_VLProcessor as Proc, Qwen2VLVideoProcessor as VProc

            text["rope_parameters"] = dict(rope_type="default", rope_theta=10000.0, mrope_section=mrope)
            vision = dict(depth=VISION_LAYERS, hidden_size=VISION_HIDDEN, intermediate_size=VISION_INTERMEDIATE,
                          num_heads=VISION_HEADS, out_hidden_size=TEXT_HIDDEN, patch_size=patch,
                          spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                          fullatt_block_indexes=[VISION_LAYERS - 1])
        else:
            from transformers import Qwen3VLConfig as Cfg, Qwen3VLForConditionalGeneration as Model
            from transformers import Qwen3VLProcessor as Proc, Qwen3VLVideoProcessor as VProc

            text["head_dim"] = head_dim
            text["rope_parameters"] = dict(rope_type="default", rope_theta=10000.0, mrope_section=mrope,
                                           mrope_interleaved=True)
            vision = dict(depth=VISION_LAYERS, hidden_size=VISION_HIDDEN, intermediate_size=VISION_INTERMEDIATE,
                          num_heads=VISION_HEADS, out_hidden_size=TEXT_HIDDEN, patch_size=patch,
                          spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=144,
                          deepstack_visual_indexes=[0, 1])
        config = Cfg(text_config=text, vision_config=vision, **tokens)
        unit = patch * 2
        size = {"shortest_edge": (4 * unit) ** 2, "longest_edge": (8 * unit) ** 2}  # 16..64 tokens
        ip = Qwen2VLImageProcessor(size=size, patch_size=patch, merge_size=2, temporal_patch_size=2)
        vp = VProc(size=size, patch_size=patch, merge_size=2, temporal_patch_size=2)
        proc = Proc(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=tok.chat_template)
        return Model(config), proc

    return build


def _build_llava(tok, vocab):
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    (image_id,) = _ids(tok, "<image>")
    vision = dict(model_type="clip_vision_model", hidden_size=VISION_HIDDEN, intermediate_size=VISION_INTERMEDIATE,
                  num_hidden_layers=VISION_LAYERS, num_attention_heads=VISION_HEADS, image_size=32, patch_size=8,
                  projection_dim=VISION_HIDDEN)
    config = LlavaConfig(vision_config=vision, text_config=_text_llama(tok, vocab), image_token_index=image_id,
                         image_seq_length=16, vision_feature_select_strategy="default", vision_feature_layer=-1)
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=tok.chat_template)
    return LlavaForConditionalGeneration(config), proc


_OV_PINPOINTS = [[32, 32], [32, 64], [64, 32]]  # at most 2 tiles: 36-56 image tokens


def _build_llava_onevision(tok, vocab):
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor)

    image_id, video_id = _ids(tok, "<image>", "<video>")
    vision = dict(model_type="siglip_vision_model", hidden_size=VISION_HIDDEN, intermediate_size=VISION_INTERMEDIATE,
                  num_hidden_layers=VISION_LAYERS, num_attention_heads=VISION_HEADS, image_size=32, patch_size=8)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=_text_qwen2(tok, vocab),
                                  image_token_index=image_id, video_token_index=video_id,
                                  vision_feature_select_strategy="full", vision_feature_layer=-1,
                                  image_grid_pinpoints=_OV_PINPOINTS)
    ip = LlavaOnevisionImageProcessor(size={"height": 32, "width": 32}, image_grid_pinpoints=_OV_PINPOINTS)
    vp = LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32})
    proc = LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, num_image_tokens=16,
                                   vision_feature_select_strategy="full", chat_template=tok.chat_template)
    return LlavaOnevisionForConditionalGeneration(config), proc


def _build_idefics3(tok, vocab):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

    (image_id,) = _ids(tok, "<image>")
    vision = dict(hidden_size=VISION_HIDDEN, intermediate_size=VISION_INTERMEDIATE, num_hidden_layers=VISION_LAYERS,
                  num_attention_heads=VISION_HEADS, image_size=64, patch_size=16)
    config = Idefics3Config(vision_config=vision, text_config=_text_llama(tok, vocab), image_token_id=image_id,
                            scale_factor=2, pad_token_id=tok.pad_token_id)
    ip = Idefics3ImageProcessor(do_image_splitting=True, size={"longest_edge": 128},
                                max_image_size={"longest_edge": 64})
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=tok.chat_template)
    return Idefics3ForConditionalGeneration(config), proc


def _build_internvl(tok, vocab):
    from transformers import (GotOcr2ImageProcessor, InternVLConfig, InternVLForConditionalGeneration,
                              InternVLProcessor, InternVLVideoProcessor)

    (image_id,) = _ids(tok, "<IMG_CONTEXT>")
    vision = dict(hidden_size=VISION_HIDDEN, intermediate_size=VISION_INTERMEDIATE, num_hidden_layers=VISION_LAYERS,
                  num_attention_heads=VISION_HEADS, image_size=[64, 64], patch_size=[8, 8])
    config = InternVLConfig(vision_config=vision, text_config=_text_qwen2(tok, vocab), image_token_id=image_id,
                            image_seq_length=16, downsample_ratio=0.5, tie_word_embeddings=False)
    ip = GotOcr2ImageProcessor(size={"height": 64, "width": 64}, crop_to_patches=True, min_patches=1, max_patches=2)
    vp = InternVLVideoProcessor(size={"height": 64, "width": 64})
    proc = InternVLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, image_seq_length=16,
                             chat_template=tok.chat_template)
    return InternVLForConditionalGeneration(config), proc


_QWEN_EXTRA = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|im_start|>"]
_QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"

_FAMILIES: dict[str, _Family] = {
    "qwen2-vl": _Family("qwen2-vl", _CHATML_TOKENS, _QWEN_EXTRA, _chatml(_QWEN_IMAGE), _qwen_vl("qwen2")),
    "qwen2.5-vl": _Family("qwen2.5-vl", _CHATML_TOKENS, _QWEN_EXTRA, _chatml(_QWEN_IMAGE), _qwen_vl("qwen2.5")),
    "qwen3-vl": _Family("qwen3-vl", _CHATML_TOKENS, _QWEN_EXTRA, _chatml(_QWEN_IMAGE), _qwen_vl("qwen3")),
    "llava": _Family(
        "llava", dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>"), ["<image>"],
        _chat_template({"system": "", "user": "USER: ", "assistant": "ASSISTANT: "},
                       {"system": "\n", "user": " ", "assistant": "</s>"}, "<image>\n", "ASSISTANT:", bos="<s>"),
        _build_llava),
    "llava-onevision": _Family("llava-onevision", _CHATML_TOKENS, ["<image>", "<video>", "<|im_start|>"],
                               _chatml("<image>\n"), _build_llava_onevision),
    "idefics3": _Family(
        "idefics3", dict(bos_token="<|begin_of_text|>", eos_token="<end_of_utterance>", pad_token="<|finetune_pad|>"),
        ["<fake_token_around_image>", "<image>", "<global-img>"]
        + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)],
        _chat_template({"system": "System: ", "user": "User:", "assistant": "Assistant: "},
                       {r: "<end_of_utterance>\n" for r in ("system", "user", "assistant")}, "<image>",
                       "Assistant:", bos="<|begin_of_text|>"),
        _build_idefics3),
    "internvl": _Family(
        "internvl", _CHATML_TOKENS,
        dict(start_image_token="<img>", end_image_token="</img>", context_image_token="<IMG_CONTEXT>",
             video_token="<video>", im_start_token="<|im_start|>"),
        _chatml("<IMG_CONTEXT>\n"), _build_internvl),
}

TINY_FAMILIES: tuple[str, ...] = tuple(_FAMILIES)


def _family(family: str) -> _Family:
    if family not in _FAMILIES:
        raise BadInput(f"tiny family {family!r} is not known; accepted: {', '.join(TINY_FAMILIES)}")
    return _FAMILIES[family]


def build_tokenizer(family: str):
    """The family's tiny tokenizer: the shared scratch BPE plus the family's special tokens and chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = _family(family)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_base_tokenizer_json()),
                                  extra_special_tokens=spec.extra_tokens, chat_template=spec.chat_template,
                                  padding_side=spec.padding_side, **spec.named_tokens)
    return tok


def build_tiny(family: str, seed: int = 0):
    """A tiny random-weight fp32 model of `family` in eval mode and its locally built processor."""
    spec = _family(family)
    tok = build_tokenizer(family)
    vocab = len(tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = spec.build(tok, vocab)
    model = model.to(torch.float32).eval()
    model.name_or_path = f"tiny:{family}"
    return model, processor


# ---- sample data ------------------------------------------------------------------------------------

_QUESTIONS = ["What is shown in this image?", "What color is the shape?", "How many objects are there?",
              "Describe the picture in one sentence.", "Where is the star located?"]


def tiny_image(rng: random.Random, width: int, height: int):
    """A synthetic RGB picture: a colored background with a few rectangles."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = rng.randrange(width // 2), rng.randrange(height // 2)
        x1, y1 = x0 + rng.randrange(4, width // 2 + 5), y0 + rng.randrange(4, height // 2 + 5)
        draw.rectangle([x0, y0, x1, y1], fill=tuple(rng.randrange(256) for _ in range(3)))
    return img


_SIZES = [(112, 112), (160, 96), (96, 160), (128, 128), (200, 120)]


def tiny_batch(processor=None, n: int = 2, seed: int = 0) -> list[tuple[Any, str, str]]:
    """`n` calibration-style samples (PIL image, question, answer) with varying image sizes and text
    lengths, so that a padded batch of them has rows of different lengths. The images suit every tiny
    family; `processor` is accepted so that callers can treat tiny and real checkpoints alike."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        w, h = _SIZES[(i + seed) % len(_SIZES)]
        c, s = rng.choice(_WORDS_COLORS), rng.choice(_WORDS_SHAPES)
        q = _QUESTIONS[(i + seed) % len(_QUESTIONS)]
        a = f"A {c} {s}." if i % 2 == 0 else f"The image shows a {c} {s} in the {rng.choice(['center', 'top', 'bottom'])} of a picture with a plain background."
        out.append((tiny_image(rng, w, h), q, a))
    return out


def chat_messages(question: str, answer: str | None = None, system: str | None = None) -> list[dict]:
    """A one-image chat in the HF messages format (the image item is a placeholder)."""
    msgs: list[dict] = []
    if system:
        msgs.append({"role": "system", "content": [{"type": "text", "text": system}]})
    msgs.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]})
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


def tiny_inputs(processor, samples, padding_side: str | None = None, system: str | None = None):
    """Processor batch (return_tensors="pt") for `samples` from `tiny_batch`."""
    texts = [processor.apply_chat_template(chat_messages(q, a, system), tokenize=False, add_generation_prompt=False)
             for _, q, a in samples]
    kw = {"padding_side": padding_side} if padding_side else {}
    return processor(text=texts, images=[[img] for img, _, _ in samples], padding=True, return_tensors="pt", **kw)
