"""The embedded default testbed: a tiny, trained, real-architecture VLM (Qwen2-VL).

``TESTBED_DIR`` holds a ``Qwen2VLForConditionalGeneration`` checkpoint trained from scratch on the
SynthVQA generator by ``testbed/train.py``, with its processor (a byte-level BPE tokenizer
built here with the ``tokenizers`` library, Qwen special tokens and a Qwen-style chat template)
and ``SHA256SUMS``. It loads offline with the ordinary ``AutoModelForImageTextToText`` /
``AutoProcessor`` classes, so every quantization method meets the same module types
(Qwen2-VL vision blocks, patch merger, GQA decoder layers with M-RoPE) it meets in a real
checkpoint, at a size a CPU runs in seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ptqbench.errors import BadInput

TESTBED_DIR = Path(__file__).resolve().parent / "testbed_model"
SUMS_NAME = "SHA256SUMS"

IMAGE_SIDE = 224  # 16x16 patches of 14 px -> 64 vision tokens after the 2x2 merge
PIXELS = IMAGE_SIDE * IMAGE_SIDE

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2-VL's chat template, without the default system prompt (kept short for a tiny model).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif content['type'] == 'video' or 'video' in content -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in content -%}"
    "{{- content['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


def _tokenizer_corpus() -> list[str]:
    """Every string the generator and the tasks can produce, plus chat scaffolding."""
    from ptqbench.data import synthvqa as sv
    from ptqbench.data.synthvqa import INSTRUCTION

    lines = ["system\n", "user\n", "assistant\n", "describe the image.", "you are a helpful assistant."] * 50
    words = list(sv.COLORS) + list(sv.SHAPES) + list(sv.BACKGROUNDS) + list(sv.WORDS) + list(sv.DIGITS)
    words += list(sv.RELATIONS) + ["yes", "no", "small", "large", "number", "word"]
    lines += words
    for group in sv.generate_multi("train", 400, seed=9999):
        for it in group:
            lines += [it.question, it.answer, it.caption, f"{it.question}{INSTRUCTION}"]
    return lines


def build_tokenizer():
    """A byte-level BPE tokenizer (Qwen2-style pre-tokenisation) over the generator's text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(tokenizer):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=PIXELS, max_pixels=PIXELS)
    return Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(min_pixels=PIXELS, max_pixels=PIXELS),
        chat_template=CHAT_TEMPLATE,
    )


def testbed_config(tokenizer=None, layers: int = 4, rope_theta: float = 10000.0,
                   mrope_section: tuple[int, int, int] = (8, 12, 12)):
    """Qwen2VLConfig of the testbed: `layers` GQA decoder layers of width 256 (4 in the shipped
    checkpoint), a 4-block vision tower. ``rope_theta`` is the decoder's M-RoPE base (Qwen2-VL's own
    checkpoints use 1e6)."""
    from transformers import Qwen2VLConfig

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = ((len(tokenizer) + 63) // 64) * 64
    text = dict(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": list(mrope_section)},
        tie_word_embeddings=True,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(
        depth=4,
        embed_dim=128,
        hidden_size=256,  # merger output = text hidden size
        mlp_ratio=4,
        num_heads=4,
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    return Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


# ----------------------------------------------------------------------------- integrity


def sha256_file(path: Path) -> str:
    from ptqbench.models.checkpoints import sha256_file

    return sha256_file(path)


def write_sha256sums(directory) -> Path:
    """Write ``SHA256SUMS`` (``sha256sum`` format) over every regular file in ``directory``."""
    from ptqbench.models.checkpoints import write_sha256sums

    return write_sha256sums(directory)


def verify_sha256sums(directory) -> None:
    """Raise BadInput naming the first file that is missing, altered or not listed (``SHA256SUMS`` required).
    The checking itself is ``ptqbench.models.sources.verify_checkpoint_sums``, which every checkpoint
    directory goes through."""
    from ptqbench.models.checkpoints import verify_checkpoint_sums

    verify_checkpoint_sums(directory, what="testbed file", required=True,
                           fix="re-run testbed/train.py to rebuild")


def load_testbed(path=TESTBED_DIR, dtype=torch.float32):
    """Verify ``SHA256SUMS`` then load ``(model, processor)`` offline, model in eval mode."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(path)
    if not path.is_dir():
        raise BadInput(f"testbed directory {str(path)!r} is missing; accepted: a directory written by "
                       "testbed/train.py")
    verify_sha256sums(path)
    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype, local_files_only=True, trust_remote_code=False)
    processor = AutoProcessor.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    model.eval()
    return model, processor
