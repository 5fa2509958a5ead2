#!/usr/bin/env python
"""Can the testbed's frozen vision features answer a position question, and how fast does a decoder learn it?

The training-only ``where`` question (one named object against the image centre: left/right/above/
below) is the single lookup a ``spatial`` question makes twice. On `--images` train-distribution
scenes (a data seed no training run uses) this trains, from scratch and on ``where`` alone:

1. ``reader``: one cross-attention layer whose query is the embedding of the asked colour and shape,
   over the 64 normalised vision tokens, then a small MLP -- the lookup with nothing else to learn.
2. ``decoder`` (``--decoder-steps N``): the testbed's own Qwen2-VL language model, re-initialised, on
   one-turn ``where`` chats (the evaluation prompt), with the standard M-RoPE position ids, or with
   ``--positions 1d`` (every token, image included, numbered 0, 1, 2, ... as in a text-only model);
   ``--mrope-section T,H,W`` / ``--rope-theta`` set which M-RoPE frequencies rotate an image token by
   its row and column (Qwen2-VL gives the column the lowest ones; docs/experiments.md).

The reader prints held-out accuracy; the decoder its training loss and held-out accuracy (teacher-forced
answer word) as they train. Chance is 0.25 accuracy, ln 4 / 2 = 0.693 mean
loss over the answer word and its ``<|im_end|>``.

    python experiments/where_learnability.py [--model DIR] [--images 2000] [--reader-steps 300]
        [--decoder-steps 500 --positions mrope|1d --mrope-section 8,12,12 --rope-theta 10000]
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptqbench.data import synthvqa as sv  # noqa: E402
from ptqbench.models import testbed as tb  # noqa: E402
from testbed.model import reinit_text_  # noqa: E402
from testbed.pool import Encoder, collate  # noqa: E402
from testbed.vision import vision_features  # noqa: E402

UNUSED_DATA_SEED = 5
WHERE = re.compile(r"where is the (\w+) (\w+) in the image")


class Reader(torch.nn.Module):
    """Query = embedding(colour) + embedding(shape); one softmax attention over the tokens; MLP to 4 classes."""

    def __init__(self, dim: int, width: int = 128):
        super().__init__()
        self.colour = torch.nn.Embedding(len(sv.COLORS), width)
        self.shape = torch.nn.Embedding(len(sv.SHAPES), width)
        self.norm = torch.nn.RMSNorm(dim)
        self.k = torch.nn.Linear(dim, width)
        self.v = torch.nn.Linear(dim, width)
        self.out = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(),
                                       torch.nn.Linear(width, len(sv.RELATIONS)))

    def forward(self, feats: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        f = self.norm(feats)
        q = self.colour(query[:, 0]) + self.shape(query[:, 1])
        w = (torch.einsum("btd,bd->bt", self.k(f), q) / math.sqrt(q.shape[-1])).softmax(-1)
        return self.out(torch.einsum("bt,btd->bd", w, self.v(f)))


def where_items(groups):
    """(image index, item) of every ``where`` question."""
    return [(i, it) for i, g in enumerate(groups) for it in g if it.family == "where"]


def train_reader(feats, items, steps: int, log=print) -> float:
    colours, shapes = list(sv.COLORS), list(sv.SHAPES)
    q = torch.tensor([[colours.index(m[1]), shapes.index(m[2])] for m in (WHERE.match(it.question) for _, it in items)])
    y = torch.tensor([sv.RELATIONS.index(it.answer) for _, it in items])
    x = torch.tensor([i for i, _ in items])
    n_tr = int(0.8 * len(items))
    model = Reader(feats.shape[-1])
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    acc = 0.0
    for step in range(steps):
        b = torch.randint(0, n_tr, (128,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(feats[x[b]], q[b]), y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            with torch.no_grad():
                acc = float((model(feats[x[n_tr:]], q[n_tr:]).argmax(-1) == y[n_tr:]).float().mean())
            log(f"reader step {step:4d} loss {loss.item():.3f} held-out acc {acc:.3f}")
    return acc


def train_decoder(prev, proc, feats, items, steps: int, positions: str, rope_theta: float, batch: int = 32,
                  log=print, mrope_section=(8, 12, 12)) -> float:
    """The testbed decoder, re-initialised, on one-turn ``where`` chats; returns the final moving-average loss."""
    from transformers import Qwen2VLForConditionalGeneration
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    torch.manual_seed(0)
    cfg = tb.testbed_config(proc.tokenizer, layers=prev.config.text_config.num_hidden_layers, rope_theta=rope_theta,
                             mrope_section=mrope_section)
    model = Qwen2VLForConditionalGeneration(cfg)
    model.model.visual.load_state_dict(prev.model.visual.state_dict())
    reinit_text_(model.model.language_model, 0.02)
    enc = Encoder(proc, feats.shape[1], False)
    seqs = [enc.encode([it]) for _, it in items]
    img = torch.tensor([i for i, _ in items])
    params = [p for n, p in model.named_parameters() if not n.startswith("model.visual")]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.98), weight_decay=0.05)
    thw = [1, sv.SIZE // 14, sv.SIZE // 14]
    g = torch.Generator().manual_seed(0)
    n_tr = int(0.8 * len(seqs))
    held = list(range(n_tr, min(len(seqs), n_tr + 256)))

    def forward(b):
        ids, attn, labels, mm = collate([seqs[i] for i in b], cfg.text_config.pad_token_id, cfg.image_token_id)
        extra = {}
        if positions == "1d":
            pos = (attn.cumsum(1) - 1).clamp(min=0)
            extra["position_ids"] = pos[None].expand(3, -1, -1)
        out = model(input_ids=ids, attention_mask=attn, image_grid_thw=torch.tensor([thw] * len(b)),
                    mm_token_type_ids=mm,
                    mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=tuple(feats[img[b]]))},
                    **extra)
        return out.logits, labels

    def held_out_acc() -> float:
        """Share of held-out questions whose answer word is the arg-max (teacher-forced)."""
        with torch.no_grad():
            logits, labels = forward(held)
        first = (labels[:, 1:] != -100).float().argmax(1)  # the answer word's position in the shifted labels
        rows = torch.arange(len(held))
        return float((logits[rows, first].argmax(-1) == labels[rows, first + 1]).float().mean())

    ema = None
    for step in range(steps):
        b = torch.randint(0, n_tr, (batch,), generator=g).tolist()
        for grp in opt.param_groups:
            grp["lr"] = 1e-3 * min(1.0, (step + 1) / 30)
        logits, labels = forward(b)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            log(f"decoder ({positions} positions {mrope_section}, rope_theta {rope_theta:g}) step {step:4d} "
                f"loss {loss.item():.3f} ema {ema:.3f} held-out acc {held_out_acc():.3f}")
    return ema


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(tb.TESTBED_DIR), help="testbed checkpoint (its vision tower is used)")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--reader-steps", type=int, default=300)
    ap.add_argument("--decoder-steps", type=int, default=0)
    ap.add_argument("--positions", choices=("mrope", "1d"), default="mrope")
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--mrope-section", default="8,12,12", help="t,h,w frequency pairs of M-RoPE (sum 32)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    prev, proc = tb.load_testbed(args.model)
    groups, _ = sv.generate_multi_with_cells("train", args.images, seed=UNUSED_DATA_SEED, extra=("where",))
    images = torch.from_numpy(np.stack([np.asarray(g[0].image.convert("RGB")) for g in groups]))
    feats = vision_features(prev, images, proc.image_processor, torch.device("cpu"))
    items = where_items(groups)
    print(f"{len(items)} where questions on {args.images} scenes (data seed {UNUSED_DATA_SEED})")
    if args.reader_steps:
        train_reader(feats, items, args.reader_steps)
    if args.decoder_steps:
        train_decoder(prev, proc, feats, items, args.decoder_steps, args.positions, args.rope_theta,
                      mrope_section=tuple(int(x) for x in args.mrope_section.split(",")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
