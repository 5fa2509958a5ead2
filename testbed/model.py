"""The model a training phase starts from: its configuration (a continued checkpoint keeps its own
architecture) and its weights (fresh, continued, or a fresh language model on a kept vision tower)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ptqbench.models import testbed as tb
from testbed.pool import log
from testbed.vision import dct_init_


def build_config(args, mrope: tuple[int, int, int]):
    """Tokenizer, processor and Qwen2-VL config of the phase.

    With ``--init-from`` (and no ``--reinit-text``) the depth, and unless given the M-RoPE base and
    split, are the checkpoint's; ``args`` records them (and ``prev_rope``, the checkpoint's M-RoPE)."""
    tok = tb.build_tokenizer()
    processor = tb.build_processor(tok)
    if args.init_from and args.reinit_text is None:  # the architecture continues the checkpoint's
        prev_cfg = json.loads((Path(args.init_from) / "config.json").read_text())
        args.layers = prev_cfg.get("text_config", prev_cfg).get("num_hidden_layers", args.layers)
        rope = prev_cfg.get("text_config", prev_cfg)["rope_parameters"]
        args.prev_rope = (tuple(rope["mrope_section"]), rope["rope_theta"])
        if args.rope_theta is None:
            args.rope_theta = rope["rope_theta"]
        if args.mrope_section is None:
            mrope = tuple(rope["mrope_section"])
            args.mrope_section = ",".join(str(x) for x in mrope)
    args.rope_theta = 10000.0 if args.rope_theta is None else args.rope_theta
    config = tb.testbed_config(tok, layers=args.layers, rope_theta=args.rope_theta, mrope_section=mrope)
    return tok, processor, config


def reinit_text_(lm: torch.nn.Module, std: float) -> None:
    """A fresh language model on a kept vision tower: N(0, std) for every matrix, zero biases, unit norms.

    The tower's features were trained to sit on the old word embeddings (the auxiliary cell loss), so
    the old decoder could answer most questions by copying a vision token through the tied LM head. A
    fresh embedding table removes that copy path: the new decoder has to learn the mapping."""
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, std)
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.zero_()


def build_model(args, config, device):
    """The phase's starting weights; draws from torch's global generator, so call it right after seeding."""
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration(config).to(device)
    if args.init_from:  # a second phase: continue from a finished checkpoint (its vision tower included)
        prev, _ = tb.load_testbed(args.init_from, dtype=torch.float32)
        if args.reinit_text is None:
            model.load_state_dict(prev.state_dict())
        else:  # only the vision tower (and its merger) carries over; the decoder may have another depth
            model.model.visual.load_state_dict(prev.model.visual.state_dict())
        del prev
        log(f"initialised from {args.init_from}")
        if args.reinit_text is not None:
            reinit_text_(model.model.language_model, args.reinit_text)
            log(f"language model re-initialised from N(0, {args.reinit_text})")
    n_params = sum(p.numel() for p in model.parameters())
    n_vis = sum(p.numel() for p in model.model.visual.parameters())
    log(f"params {n_params / 1e6:.2f}M (vision {n_vis / 1e6:.2f}M), vocab {config.text_config.vocab_size}")
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.bos_token_id = config.text_config.bos_token_id
    model.generation_config.do_sample = False
    if args.dct_init and not args.init_from:
        dct_init_(model.model.visual.patch_embed.proj)
    return model
