"""Talking to a Hugging Face VLM through its processor, one way everywhere.

The chat turns and their rendering by the processor's chat template, a left-padded batch on the
model's device, the token ids that stop generation and pad a batch, and progress reporting. Used by
calibration capture (`engine`), latency measurement (`deploy`) and the scoring tasks (`eval`), so that
a prompt means the same thing in all three.
"""

from __future__ import annotations

import torch

from ptqbench.errors import BadInput

IM_END = "<|im_end|>"  # the end-of-turn token of ChatML templates (Qwen2-VL and the testbed)


# ---- chat turns ----------------------------------------------------------------------------------
def user_turn(text: str, n_images: int = 0) -> dict:
    """A user message: `n_images` image placeholders, then the text (the HF messages format)."""
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def assistant_turn(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def chat_text(processor, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The messages rendered (not tokenized) by the processor's chat template."""
    return processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def generation_prompt(processor, text: str, n_images: int = 0) -> str:
    """One user turn rendered with the generation prompt: what a model answers from."""
    return chat_text(processor, [user_turn(text, n_images)], add_generation_prompt=True)


# ---- batches -------------------------------------------------------------------------------------
def to_device(enc, device, float_dtype: torch.dtype | None = None) -> dict:
    """A processor batch with its tensors on `device` (float tensors cast to `float_dtype` when given)."""
    out = {}
    for k, v in enc.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if float_dtype is not None and v.is_floating_point():
                v = v.to(float_dtype)
        out[k] = v
    return out


def encode_left(processor, texts: list[str], images: list, device) -> dict:
    """Left-padded batch of `texts` on `device` (generation and answer scoring read the right end).
    `images`: one flat list, in the order the prompts' image placeholders appear; empty: text only."""
    enc = processor(text=texts, images=images or None, padding=True, padding_side="left", return_tensors="pt")
    return to_device(enc, device)


def stop_and_pad_ids(tokenizer, im_end_if_in_vocab: bool) -> tuple[list[int], int]:
    """(token ids that end generation: IM_END and the tokenizer's EOS, deduplicated; the pad id).

    `im_end_if_in_vocab` says how IM_END is looked up, and the two callers differ on purpose:
    - False (the built-in ``synthvqa`` task): `convert_tokens_to_ids`, which maps a token absent from
      the vocabulary to the unknown token's id, so such a tokenizer also stops at its unknown token.
      Kept so: the published synthvqa scores were generated with these stop ids.
    - True (the lmms-eval bridge): IM_END only when the vocabulary holds it.
    They agree on every tokenizer that has IM_END (the testbed, Qwen2-VL)."""
    if im_end_if_in_vocab:
        im_end = tokenizer.convert_tokens_to_ids(IM_END) if IM_END in tokenizer.get_vocab() else None
    else:
        im_end = tokenizer.convert_tokens_to_ids(IM_END)
    eos = [e for e in dict.fromkeys([im_end, tokenizer.eos_token_id]) if isinstance(e, int) and e >= 0]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    return eos, pad


# ---- progress ------------------------------------------------------------------------------------
class ProgressReporter:
    """Reports work done to `progress`: None, a callable ``(done, total)``, or a rich ``Progress``
    (``add_task`` / ``advance``; its task is removed on `close` when it has ``remove_task``)."""

    def __init__(self, progress, label: str, total: int):
        self.p, self.total, self.done, self.task = progress, total, 0, None
        if progress is not None and hasattr(progress, "add_task"):
            self.task = progress.add_task(label, total=total)
        elif progress is not None and not callable(progress):
            raise BadInput(f"progress {progress!r} is not accepted; accepted: None, a callable (done, total), "
                           "or a rich Progress")

    def advance(self, k: int = 1) -> None:
        self.done += k
        if self.task is not None:
            self.p.advance(self.task, k)
        elif self.p is not None:
            self.p(self.done, self.total)

    def close(self) -> None:
        if self.task is not None and hasattr(self.p, "remove_task"):
            self.p.remove_task(self.task)
