#!/usr/bin/env python
"""Train the embedded testbed VLM (Qwen2-VL architecture, from scratch) on SynthVQA.

Reproduces ``ptqbench/models/testbed_model/``: builds the tokenizer/processor/config from
``ptqbench.models.testbed``, pre-renders the ``train`` split (each image with one question of
every family, as a multi-turn chat), trains with answer-only cross-entropy (prompt tokens -100),
saves the checkpoint (fp16 storage), reloads it through ``load_testbed`` and scores the held-out
``eval`` split with the ``synthvqa`` / ``synthvqa-nll`` tasks, then writes MODEL_CARD.md and
SHA256SUMS. Uses CUDA when available, else CPU.

    python scripts/train_testbed.py --out ptqbench/models/testbed_model
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# On a shared CPU, spinning OpenMP workers stall each other badly (measured 4x slower steps at load 8
# on 2 cores); passive waiting costs nothing when the cores are free. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptqbench.data import synthvqa as sv  # noqa: E402
from ptqbench.eval import tasks as T  # noqa: E402
from ptqbench.models import testbed as tb  # noqa: E402


CAPTION_PROMPT = "describe the image."


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# ----------------------------------------------------------------------------- data


def patchify(images_u8: torch.Tensor, ip) -> torch.Tensor:
    """Qwen2-VL patch extraction for (B, 3, H, W) uint8 images already at the target size.

    Matches ``Qwen2VLImageProcessor`` (checked against it at start-up).
    """
    B, C, H, W = images_u8.shape
    ps, tps, ms = ip.patch_size, ip.temporal_patch_size, ip.merge_size
    mean = torch.tensor(ip.image_mean, dtype=torch.float32, device=images_u8.device).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std, dtype=torch.float32, device=images_u8.device).view(1, 3, 1, 1)
    x = (images_u8.float() * ip.rescale_factor - mean) / std
    x = x.unsqueeze(1).expand(B, tps, C, H, W)  # a still image repeated over the temporal patch
    gh, gw = H // ps, W // ps
    x = x.reshape(B, 1, tps, C, gh // ms, ms, ps, gw // ms, ms, ps)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return x.reshape(B * gh * gw, C * tps * ps * ps).contiguous()


class Encoder:
    """Turns a group of Items (same image, several questions) into ids + answer-only labels."""

    def __init__(self, processor, n_image_tokens: int, instruction_every_turn: bool):
        self.p = processor
        self.tok = processor.tokenizer
        self.n_img = n_image_tokens
        self.image_id = self.tok.convert_tokens_to_ids("<|image_pad|>")
        self.every = instruction_every_turn

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def messages(self, group, caption: str | None = None):
        msgs = []
        for k, it in enumerate(group):
            q = T.user_text(it.question) if (k == 0 or self.every) else it.question
            content = ([{"type": "image"}] if k == 0 else []) + [{"type": "text", "text": q}]
            msgs.append({"role": "user", "content": content})
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": it.answer}]})
        if caption is not None:  # dense supervision: every object, its colour/size, left-to-right order, the text
            msgs.append({"role": "user", "content": [{"type": "text", "text": CAPTION_PROMPT}]})
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": caption}]})
        return msgs

    def encode(self, group, caption: str | None = None, check: bool = False):
        msgs = self.messages(group, caption)
        ids: list[int] = []
        labels: list[int] = []
        for k in range(0, len(msgs), 2):
            before = self.p.apply_chat_template(msgs[:k], tokenize=False) if k else ""
            prompt = self.p.apply_chat_template(msgs[:k + 1], add_generation_prompt=True, tokenize=False)
            turn = self.p.apply_chat_template(msgs[:k + 2], tokenize=False)
            assert prompt.startswith(before) and turn.startswith(prompt)
            ans = msgs[k + 1]["content"][0]["text"]
            rest = turn[len(prompt):]
            assert rest.startswith(ans + "<|im_end|>")
            a_ids = self._ids(ans + "<|im_end|>")
            p_ids = self._ids(prompt[len(before):])
            t_ids = self._ids(rest[len(ans) + len("<|im_end|>"):])
            ids += p_ids + a_ids + t_ids
            labels += [-100] * len(p_ids) + a_ids + [-100] * len(t_ids)
        if check:
            full = self.p.apply_chat_template(msgs, tokenize=False)
            assert self._ids(full) == ids, "segment tokenisation differs from whole-string tokenisation"
        # expand the single image placeholder to the number of merged vision tokens
        k = ids.index(self.image_id)
        ids = ids[:k] + [self.image_id] * self.n_img + ids[k + 1:]
        labels = labels[:k] + [-100] * self.n_img + labels[k + 1:]
        return ids, labels


def keep_families(labels: list[int], families: list[str], keep: tuple[str, ...]) -> list[int]:
    """Labels with the answers of families outside ``keep`` masked (-100): a focus phase.

    Answers are the contiguous label runs, in the order of ``families`` (a caption turn, if any, is
    the run after the last family and counts as the family ``caption``)."""
    out, run, prev = list(labels), -1, -100
    for i, t in enumerate(labels):
        if t != -100 and prev == -100:
            run += 1
        if t != -100 and (families[run] if run < len(families) else "caption") not in keep:
            out[i] = -100
        prev = t
    return out


def collate(batch, pad_id: int, image_id: int):
    """Left-pad (the eval task generates with left padding too)."""
    L = max(len(ids) for ids, _ in batch)
    B = len(batch)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), -100, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    for b, (ids, lab) in enumerate(batch):
        n = len(ids)
        input_ids[b, L - n:] = torch.tensor(ids)
        labels[b, L - n:] = torch.tensor(lab)
        attn[b, L - n:] = 1
    mm = (input_ids == image_id).long() * attn
    return input_ids, attn, labels, mm


_WORKER_ENCODER = None  # set before the pool forks: workers inherit it


def _render_chunk(job):
    """Render and encode items [start, start + n) of the pool (deterministic per item index)."""
    start, n, seed, max_objects, extra, captions, singles = job
    groups, cl = sv.generate_multi_with_cells("train", n, seed=seed, start=start, max_objects=max_objects,
                                              extra=extra)
    images = np.stack([np.asarray(g[0].image.convert("RGB")) for g in groups])
    seqs = []
    for j, g in enumerate(groups):
        ids, lab = _WORKER_ENCODER.encode(g, caption=g[0].caption if captions[j] else None, check=(start + j) < 20)
        seqs.append((ids, lab, [it.family for it in g])
                    + ((tuple(_WORKER_ENCODER.encode([it]) for it in g),) if singles else ()))
    return images, seqs, cl


def build_cache(path: Path, n_images: int, seed: int, encoder: Encoder, max_objects: int = 5,
                caption_prob: float = 0.0, extra: tuple[str, ...] = (), workers: int = 1, singles: bool = False):
    """Pre-render a training pool once: uint8 images + token ids + labels (+ families).

    Items depend on their index alone, so `workers` processes render chunks with identical results."""
    global _WORKER_ENCODER
    meta = {"n": n_images, "seed": seed, "vocab": len(encoder.tok), "max_objects": max_objects,
            "caption_prob": caption_prob, "every": encoder.every, "version": 3,
            **({"extra": list(extra)} if extra else {}), **({"singles": True} if singles else {})}
    if path.exists():
        try:  # weights_only: tensors, dicts, lists and scalars only, so a planted file cannot run code
            z = torch.load(path, weights_only=True)
        except Exception as e:  # noqa: BLE001 - damaged or foreign: render the pool again
            log(f"training cache {path} not usable ({type(e).__name__}); rendering it again")
            z = {}
        if all(z.get(k) == v for k, v in meta.items()):
            log(f"loaded training cache {path} ({n_images} images)")
            return z
    log(f"rendering {n_images} training images (seed {seed}, max {max_objects} objects, {workers} workers) ...")
    cap_rng = np.random.default_rng([seed, max_objects, 77])
    captions = [cap_rng.random() < caption_prob for _ in range(n_images)]  # the same draws as one at a time
    t0 = time.time()
    chunk = 500
    jobs = [(st, min(chunk, n_images - st), seed, max_objects, extra, captions[st:st + chunk], singles)
            for st in range(0, n_images, chunk)]
    _WORKER_ENCODER = encoder
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_render_chunk, jobs)
    else:
        parts = [_render_chunk(j) for j in jobs]
    images = np.concatenate([p[0] for p in parts])
    seqs = [s for p in parts for s in p[1]]
    cells = [c for p in parts for c in p[2]]
    z = {**meta, "images": torch.from_numpy(images), "seqs": seqs, "cells": torch.from_numpy(np.stack(cells))}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(z, path)
    log(f"rendered in {time.time() - t0:.0f}s -> {path}")
    return z


def dct_init_(conv: torch.nn.Conv3d) -> None:
    """Initialise the patch embedding with an orthonormal low-frequency 2D DCT basis per colour channel.

    With the default N(0, 0.02) init, a patch's colour is entangled with the random per-pixel
    weights and the from-scratch vision tower barely learns (measured: not even the colour of a
    lone object within 100 steps); DCT filters separate colour (DC terms) from shape (low
    frequencies) from the first step.
    """
    out_c, in_c, t, p, _ = conv.weight.shape
    x = torch.arange(p, dtype=torch.float64)
    freqs = sorted(((u, v) for u in range(p) for v in range(p)), key=lambda f: (f[0] + f[1], f[0]))
    w = torch.zeros(out_c, in_c, t, p, p, dtype=torch.float64)
    k = 0
    for u, v in freqs:
        b = torch.cos(math.pi * (2 * x + 1) * u / (2 * p))[:, None] * torch.cos(math.pi * (2 * x + 1) * v / (2 * p))[None]
        b = b / b.norm() / math.sqrt(t)
        for c in range(in_c):
            if k < out_c:
                w[k, c] = b
                k += 1
    with torch.no_grad():
        conv.weight.copy_(w.to(conv.weight.dtype))


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


@torch.no_grad()
def vision_features(model, images_u8: torch.Tensor, ip, device, batch: int = 64) -> torch.Tensor:
    """Merger outputs of a frozen vision tower for a whole pool, (N, tokens, hidden) float32 on the CPU."""
    model.eval()
    thw1 = [1, sv.SIZE // 14, sv.SIZE // 14]
    out = []
    t0 = time.time()
    for st in range(0, len(images_u8), batch):
        x = images_u8[st:st + batch]
        pv = patchify(x.to(device).permute(0, 3, 1, 2), ip)
        f = model.model.visual(pv, grid_thw=torch.tensor([thw1] * len(x)).to(device)).pooler_output
        out.append(f.view(len(x), -1, f.shape[-1]).to("cpu", torch.float32))
    log(f"vision features of {len(images_u8)} images in {time.time() - t0:.0f}s")
    return torch.cat(out)


def spectral_flatness_penalty(weights) -> torch.Tensor:
    """Mean over matrices of ||G / mean(diag G) - I||_F^2 / d, G the smaller Gram matrix (d x d).

    Zero when every singular value is equal; a low-rank matrix scores about d / rank. Scale-free, so
    it shapes the spectrum without shrinking the weights."""
    tot = 0.0
    for w in weights:
        w = w.float()
        g = w @ w.t() if w.shape[0] <= w.shape[1] else w.t() @ w
        d = g.shape[0]
        g = g / (g.diagonal().mean() + 1e-12)
        tot = tot + ((g - torch.eye(d, device=g.device)) ** 2).sum() / d
    return tot / len(weights)


class CellHead(torch.nn.Module):
    """Auxiliary per-token loss on the merger output, scored against the LLM's own word embeddings.

    Each merged vision token is classified three ways -- colour, shape, text (what the grid cell
    under it holds, from the generator's scene description) -- with logits ``feats @ E[word]^T``
    where ``E`` is the (tied) embedding of the answer word ("red", "circle", "7", "cat"), plus a
    learned "nothing here" vector. Image tokens thus land near the embeddings of the words that
    describe them, the way a projector pre-trained for alignment does, and the LLM can answer by
    copying. Only used for training; not part of the checkpoint.
    """

    def __init__(self, model, tokenizer, with_count: bool = False):
        super().__init__()
        self.model = [model]  # not a submodule: the embedding belongs to the model
        groups = [list(sv.COLORS), list(sv.SHAPES), list(sv.DIGITS) + list(sv.WORDS)]
        ids = []
        for words in groups:
            row = []
            for w in words:
                t = tokenizer(w, add_special_tokens=False)["input_ids"]
                assert len(t) == 1, f"answer {w!r} is not a single token"
                row.append(t[0])
            ids.append(torch.tensor(row))
        for j, t in enumerate(ids):
            self.register_buffer(f"ids{j}", t)
        dim = model.config.text_config.hidden_size
        self.none = torch.nn.Parameter(torch.randn(3, dim) * 0.02)
        # Absolute grid row / column of every token: the vision tower only has relative (RoPE)
        # positions, and spatial questions need to compare where two objects are.
        self.grid = sv.GRID
        self.pos = torch.nn.Linear(dim, 2 * sv.GRID)
        # Optional: each object token also predicts how many objects of its shape the image holds
        # (global context in every token, as a real encoder's tokens carry; a count question becomes
        # "find a token of that shape, read its count", the retrieval the LLM learns first).
        self.with_count = with_count
        self.count = torch.nn.Linear(dim, 1 + sv.MAX_COUNT)

    def same_shape_counts(self, cells: torch.Tensor) -> torch.Tensor:
        g2 = self.grid * self.grid
        s = cells[:, 1].view(-1, g2)
        c = ((s[:, :, None] == s[:, None, :]) & (s[:, None, :] > 0)).sum(-1)
        return torch.where(s > 0, c, torch.zeros_like(c)).reshape(-1)

    def targets(self, cells: torch.Tensor) -> torch.Tensor:
        t = cells.clone()
        words = t[:, 2] > 10  # word parts (11 + 2w + part) -> one class per word
        t[words, 2] = 11 + (t[words, 2] - 11) // 2
        return t

    def logits(self, feats: torch.Tensor, j: int) -> torch.Tensor:
        emb = self.model[0].get_input_embeddings().weight
        w = torch.cat([self.none[j:j + 1], emb[getattr(self, f"ids{j}")]])
        return feats @ w.t()

    def loss(self, feats: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        y = self.targets(cells)
        tot = 0.0
        for j in range(3):
            lg = self.logits(feats, j)
            w = torch.ones(lg.shape[-1], device=feats.device)
            w[0] = 0.1  # object/text cells are rare: "nothing here" must not dominate
            tot = tot + torch.nn.functional.cross_entropy(lg, y[:, j], weight=w)
        rc = self._rowcol(len(y), feats.device)
        pl = self.pos(feats)
        tot = tot + 0.5 * (torch.nn.functional.cross_entropy(pl[:, :self.grid], rc[:, 0])
                           + torch.nn.functional.cross_entropy(pl[:, self.grid:], rc[:, 1]))
        if not self.with_count:
            return tot / 4
        w = torch.ones(1 + sv.MAX_COUNT, device=feats.device)
        w[0] = 0.1
        return (tot + torch.nn.functional.cross_entropy(self.count(feats), self.same_shape_counts(cells), weight=w)) / 5

    def _rowcol(self, n: int, device) -> torch.Tensor:
        k = torch.arange(n, device=device) % (self.grid * self.grid)
        return torch.stack([k // self.grid, k % self.grid], 1)

    @torch.no_grad()
    def accuracy(self, feats: torch.Tensor, cells: torch.Tensor) -> list[float]:
        y = self.targets(cells)
        out = []
        for j in range(3):
            m = y[:, j] > 0
            out.append(float((self.logits(feats[m], j).argmax(-1) == y[m, j]).float().mean()) if m.any() else float("nan"))
        rc = self._rowcol(len(y), feats.device)
        pl = self.pos(feats)
        out.append(float(((pl[:, :self.grid].argmax(-1) == rc[:, 0]) & (pl[:, self.grid:].argmax(-1) == rc[:, 1])).float().mean()))
        if self.with_count:
            c = self.same_shape_counts(cells)
            m = c > 0
            out.append(float((self.count(feats[m]).argmax(-1) == c[m]).float().mean()))
        return out


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(tb.TESTBED_DIR))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--data-seed", type=int, default=sv.DEFAULT_SEED["train"])
    ap.add_argument("--images", type=int, default=12000, help="training pool size (images)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16, help="images per step (each with 6 questions)")
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--eval-n", type=int, default=T.DEFAULT_N)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--probe-n", type=int, default=96, help="items for the periodic eval")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=str(ROOT / "runs" / "testbed_cache"))
    ap.add_argument("--instruction-every-turn", action="store_true")
    ap.add_argument("--easy-images", type=int, default=0, help="curriculum pool of simple scenes")
    ap.add_argument("--easy-objects", type=int, default=1, help="objects per curriculum scene (1 or 2)")
    ap.add_argument("--easy-steps", type=int, default=0,
                    help="share of easy images falls linearly from 1 to 0 over these first steps")
    ap.add_argument("--dct-init", action="store_true", help="DCT-basis init of the patch embedding")
    ap.add_argument("--vision-steps", type=int, default=0,
                    help="stage 1: pre-train the vision tower alone with the per-token cell loss")
    ap.add_argument("--vision-lr", type=float, default=1e-3)
    ap.add_argument("--vision-batch", type=int, default=16)
    ap.add_argument("--freeze-vision", action="store_true",
                    help="stage 2: keep the pre-trained vision tower fixed (its features are computed once per "
                         "pool image and reused every epoch)")
    ap.add_argument("--spectral-reg", type=float, default=0.0, metavar="LAMBDA",
                    help="weight of a penalty pulling every decoder matrix's singular values towards equal "
                         "(an experiment: a decoder that must use its whole width)")
    ap.add_argument("--spectral-from", type=int, default=0, metavar="STEP",
                    help="first step of the --spectral-reg penalty (later: a position read-out first, then flatness)")
    ap.add_argument("--reinit-text", type=float, default=None, metavar="STD",
                    help="with --init-from: keep the vision tower, re-initialise the language model (embeddings, "
                         "decoder, final norm) from N(0, STD) and train it from scratch")
    ap.add_argument("--focus", default="", help="comma-separated families whose answers alone are trained for the "
                    "first --focus-steps steps (the others' labels are masked)")
    ap.add_argument("--focus-steps", type=int, default=0)
    ap.add_argument("--focus-batch", type=int, default=0,
                    help="images per step during the focus steps (default --batch; with --single-turn a focus step "
                         "trains only the focus chats, so it can afford more images)")
    ap.add_argument("--focus-keep", type=float, default=0.0, metavar="P",
                    help="with --single-turn: during the focus steps keep each other family's chat with probability "
                         "P (so the families already learned are rehearsed, not forgotten, while the focus is learned)")
    ap.add_argument("--constant-lr", action="store_true",
                    help="hold the learning rate at --lr after the warm-up (no cosine decay: for a plateau that "
                         "must be left before any decay)")
    ap.add_argument("--single-turn", action="store_true",
                    help="with --freeze-vision: train every question as its own one-turn chat right after the image "
                         "(the evaluation prompt), instead of one multi-turn chat per image")
    ap.add_argument("--rope-theta", type=float, default=None,
                    help="M-RoPE base (Qwen2-VL checkpoints use 1e6); default 1e4, or with --init-from the "
                         "checkpoint's own (a new base scrambles a trained decoder's text positions)")
    ap.add_argument("--mrope-section", default=None, metavar="T,H,W",
                    help="M-RoPE frequency pairs given to the temporal, row and column position (sum 32; the "
                         "lowest frequencies go last, to the column); default 8,12,12, or with --init-from the "
                         "checkpoint's own. Text tokens have equal t, h, w positions, so a new split moves only "
                         "how image tokens are rotated")
    ap.add_argument("--aux-weight", type=float, default=0.0,
                    help="stage 2: weight of the per-token cell loss added to the answer loss")
    ap.add_argument("--aux-count", action="store_true",
                    help="the auxiliary cell loss also asks each object token for the count of its shape in the image")
    ap.add_argument("--caption-prob", type=float, default=0.0,
                    help="share of training images that also get a 'describe the image.' turn")
    ap.add_argument("--extra", default="", help="comma-separated families asked a second time per image (e.g. count,spatial)")
    ap.add_argument("--prepare-only", action="store_true", help="render the training pool cache and stop")
    ap.add_argument("--init-from", default=None,
                    help="start from this finished checkpoint directory (a second training phase; use --vision-steps 0)")
    ap.add_argument("--no-final", action="store_true", help="skip saving (for quick design runs)")
    ap.add_argument("--layers", type=int, default=4,
                    help="decoder layers of a from-scratch model or a --reinit-text decoder (otherwise, with "
                         "--init-from, the checkpoint's own count)")
    ap.add_argument("--workers", type=int, default=1, help="processes rendering the training pool")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="wall-clock budget of the QA training loop: the LR schedule follows the larger of step and "
                         "time progress, and training stops when either is spent (for a leased GPU)")
    args = ap.parse_args(argv)
    focus = tuple(f for f in args.focus.split(",") if f)
    for f in focus:
        if f not in sv.FAMILIES + sv.TRAIN_FAMILIES:
            ap.error(f"--focus {f!r}: accepted families are {', '.join(sv.FAMILIES + sv.TRAIN_FAMILIES)}")
    if args.focus_batch and not args.focus_steps:
        ap.error("--focus-batch needs --focus-steps")
    if args.focus_steps and not focus:
        ap.error("--focus-steps needs --focus FAMILIES")
    if not 0.0 <= args.focus_keep <= 1.0:
        ap.error(f"--focus-keep {args.focus_keep!r}: accepted values are probabilities in [0, 1]")
    if args.focus_keep and not (args.single_turn and args.focus_steps):
        ap.error("--focus-keep needs --single-turn and --focus-steps")
    if args.single_turn and not args.freeze_vision:
        ap.error("--single-turn needs --freeze-vision (one tower pass per image, reused by its chats)")
    if args.single_turn and (args.easy_images or args.caption_prob):
        ap.error("--single-turn does not combine with --easy-images or --caption-prob")
    try:
        mrope = tuple(int(x) for x in (args.mrope_section or "8,12,12").split(","))
        assert len(mrope) == 3 and min(mrope) >= 0 and sum(mrope) == 32
    except (ValueError, AssertionError):
        ap.error(f"--mrope-section {args.mrope_section!r}: three non-negative integers summing to 32, e.g. 8,12,12")
    if args.reinit_text is not None and not (args.init_from and args.reinit_text > 0):
        ap.error(f"--reinit-text {args.reinit_text}: needs --init-from (the tower to keep) and a positive std")

    t_start = time.time()
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")

    from transformers import Qwen2VLForConditionalGeneration
    import transformers

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
    n_img_tokens = (sv.SIZE // 14) ** 2 // 4
    enc = Encoder(processor, n_img_tokens, args.instruction_every_turn)

    # patchify must match the processor
    probe = sv.generate("calib", 4)
    ref = processor.image_processor(images=[it.image for it in probe], return_tensors="pt")
    mine = patchify(torch.from_numpy(np.stack([np.asarray(it.image) for it in probe])).permute(0, 3, 1, 2),
                    processor.image_processor)
    assert torch.allclose(ref["pixel_values"], mine, atol=1e-5), "patchify differs from the processor"
    assert ref["image_grid_thw"][0].tolist() == [1, sv.SIZE // 14, sv.SIZE // 14]

    tag = f"_c{args.caption_prob:g}" if args.caption_prob else ""
    tag += "_every" if args.instruction_every_turn else ""
    extra = tuple(f for f in args.extra.split(",") if f)
    tag += ("_x" + "-".join(extra)) if extra else ""
    tag += "_single" if args.single_turn else ""
    cache_path = Path(args.cache) / f"pool_n{args.images}_s{args.data_seed}{tag}.pt"
    data = build_cache(cache_path, args.images, args.data_seed, enc, 5, args.caption_prob, extra, args.workers,
                       singles=args.single_turn)
    images, seqs, cells = data["images"], data["seqs"], data["cells"]
    if args.prepare_only:
        return 0
    if args.easy_images and args.easy_steps:
        easy = build_cache(Path(args.cache) / f"easy{args.easy_objects}_n{args.easy_images}_s{args.data_seed}{tag}.pt",
                           args.easy_images, args.data_seed, enc, args.easy_objects, args.caption_prob)
        e_images, e_seqs, e_cells = easy["images"], easy["seqs"], easy["cells"]
    else:
        e_images, e_seqs, e_cells = images[:0], [], cells[:0]

    seed_everything(args.seed)
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
    ip = processor.image_processor
    thw1 = [1, sv.SIZE // 14, sv.SIZE // 14]
    cell_head = CellHead(model, tok, with_count=args.aux_count).to(device)

    vision_heldout = None
    # ---- stage 1: the vision tower alone, per-token cell classification (a stand-in for a pre-trained encoder)
    if args.vision_steps:
        vparams = list(model.model.visual.parameters()) + list(cell_head.parameters())
        vopt = torch.optim.AdamW(vparams, lr=args.vision_lr, betas=(0.9, 0.98), weight_decay=0.0)
        gv = torch.Generator().manual_seed(args.seed + 1)
        t_vis = time.time()
        model.train()
        for step in range(args.vision_steps):
            idx = torch.randint(0, len(seqs), (args.vision_batch,), generator=gv).tolist()
            for grp in vopt.param_groups:
                grp["lr"] = args.vision_lr * min(1.0, (step + 1) / 20)
            pv = patchify(images[idx].to(device).permute(0, 3, 1, 2), ip)
            thw = torch.tensor([thw1] * len(idx))
            feats = model.model.visual(pv, grid_thw=thw.to(device)).pooler_output
            vloss = cell_head.loss(feats, cells[idx].reshape(-1, 3).to(device))
            vopt.zero_grad(set_to_none=True)
            vloss.backward()
            torch.nn.utils.clip_grad_norm_(vparams, 1.0)
            vopt.step()
            if step % 20 == 0 or step == args.vision_steps - 1:
                accs = cell_head.accuracy(feats, cells[idx].reshape(-1, 3).to(device))
                log(f"vision step {step:4d} cell loss {vloss.item():.4f} acc colour {accs[0]:.2f} shape {accs[1]:.2f} "
                    f"text {accs[2]:.2f} position {accs[3]:.2f} ({(time.time() - t_vis) / (step + 1):.2f}s/step)")
        log(f"vision pre-training done in {(time.time() - t_vis) / 60:.1f} min")
        # held-out check on calibration-split scenes (never trained on)
        model.eval()
        with torch.no_grad():
            hg, hc = sv.generate_multi_with_cells("calib", 64, seed=args.data_seed)
            himg = torch.from_numpy(np.stack([np.asarray(g[0].image.convert("RGB")) for g in hg]))
            hf = model.model.visual(patchify(himg.permute(0, 3, 1, 2), ip).to(device),
                                    grid_thw=torch.tensor([thw1] * len(hg)).to(device)).pooler_output
            accs = cell_head.accuracy(hf, torch.from_numpy(np.stack(hc)).reshape(-1, 3).to(device))
        log(f"vision held-out cell acc colour {accs[0]:.3f} shape {accs[1]:.3f} text {accs[2]:.3f} position {accs[3]:.3f}")
        vision_heldout = accs
    vis_cache = e_vis_cache = None
    if args.freeze_vision:
        for p_ in model.model.visual.parameters():
            p_.requires_grad_(False)
        vis_cache = vision_features(model, images, ip, device)
        e_vis_cache = vision_features(model, e_images, ip, device) if e_seqs else None
    captured = {}
    model.model.visual.merger.register_forward_hook(lambda mod, inp, out: captured.__setitem__("f", out))

    decoder_linears = [m.weight for n, m in model.model.language_model.layers.named_modules()
                       if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        spec_before = float(spectral_flatness_penalty(decoder_linears))
        g_ref = torch.Generator().manual_seed(0)  # the reference: random Gaussian matrices of the same shapes
        spec_random = float(spectral_flatness_penalty([torch.randn(w.shape, generator=g_ref) for w in decoder_linears]))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in trainable if not (p.ndim >= 2 and "embed" not in n)]
    no_decay += list(cell_head.parameters()) if args.aux_weight else []
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8)

    def progress(step):
        p = (step - args.warmup) / max(1, args.steps - args.warmup)
        if args.max_minutes:
            p = max(p, (time.time() - t_train) / (60 * args.max_minutes))
        return p

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        if args.constant_lr:
            return args.lr
        p = min(1.0, progress(step))
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))

    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(seqs), generator=g).tolist()
    pos = 0
    e_order = torch.randperm(len(e_seqs), generator=g).tolist() if e_seqs else []
    e_pos = 0
    pad_id = config.text_config.pad_token_id
    image_id = config.image_token_id
    task = T.SynthVQAAccuracy()
    history = []
    ema = None
    fam_ema: dict[str, float] = {}
    t_train = time.time()
    steps_done = 0
    for step in range(args.steps):
        if step >= args.warmup and progress(step) >= 1.0:
            log(f"time budget spent after {step} steps")
            break
        steps_done = step + 1
        p_easy = max(0.0, 1.0 - step / args.easy_steps) if (e_seqs and args.easy_steps) else 0.0
        n_easy = int((torch.rand(args.batch, generator=g) < p_easy).sum())
        batch = args.focus_batch if (args.focus_batch and step < args.focus_steps) else args.batch
        if pos + batch - n_easy > len(order):
            order = torch.randperm(len(seqs), generator=g).tolist()
            pos = 0
        if e_pos + n_easy > len(e_order):
            e_order = torch.randperm(len(e_seqs), generator=g).tolist()
            e_pos = 0
        idx = order[pos:pos + batch - n_easy]
        e_idx = e_order[e_pos:e_pos + n_easy]
        pos += len(idx)
        e_pos += n_easy
        batch_seqs = [seqs[i][:2] for i in idx] + [e_seqs[i][:2] for i in e_idx]
        per_image = [1] * len(batch_seqs)
        if args.single_turn:  # every question of the image as its own one-turn chat (the eval's prompt shape)
            keep = focus if step < args.focus_steps else None
            chats = [[(sq, fam) for sq, fam in zip(seqs[i][3], seqs[i][2])
                      if keep is None or fam in keep
                      or (args.focus_keep and float(torch.rand(1, generator=g)) < args.focus_keep)]
                     for i in idx]
            per_image = [len(c) for c in chats]
            batch_seqs = [sq for c in chats for sq, _ in c]
            chat_fams = [fam for c in chats for _, fam in c]
        elif step < args.focus_steps:
            batch_seqs = [(ids, keep_families(lab, fams, focus))
                          for ids, lab, fams, *_ in [seqs[i] for i in idx] + [e_seqs[i] for i in e_idx]]
        batch_cells = torch.cat([cells[idx], e_cells[e_idx]]) if n_easy else cells[idx]
        input_ids, attn, labels, mm = collate(batch_seqs, pad_id, image_id)
        thw = torch.tensor([[1, sv.SIZE // 14, sv.SIZE // 14]] * len(batch_seqs))
        if vis_cache is not None:  # frozen tower: the features computed once, as the tower would give them
            f = torch.cat([vis_cache[idx], e_vis_cache[e_idx]]) if n_easy else vis_cache[idx]
            if args.single_turn:
                f = f.repeat_interleave(torch.tensor(per_image), dim=0)
            image_in = {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(
                pooler_output=tuple(f.to(device, torch.float32)))}}
        else:
            batch_img = torch.cat([images[idx], e_images[e_idx]]) if n_easy else images[idx]
            image_in = {"pixel_values": patchify(batch_img.to(device).permute(0, 3, 1, 2), ip).to(device)}
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step)
        model.train()
        out = model(input_ids=input_ids.to(device), attention_mask=attn.to(device), **image_in,
                    image_grid_thw=thw.to(device), mm_token_type_ids=mm.to(device))
        # mean cross-entropy over answer tokens (as the model's own loss), kept per token for logging
        tgt = labels[:, 1:].to(device)
        tok_loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].float().transpose(1, 2), tgt,
                                                     ignore_index=-100, reduction="none")
        n_tok = (tgt != -100).sum()
        loss = tok_loss.sum() / n_tok
        aux = cell_head.loss(captured["f"], batch_cells.reshape(-1, 3).to(device)) \
            if args.aux_weight and not args.freeze_vision else None
        total = loss + args.aux_weight * aux if aux is not None else loss
        spec = spectral_flatness_penalty(decoder_linears) if args.spectral_reg and step >= args.spectral_from else None
        if spec is not None:
            total = total + args.spectral_reg * spec
        opt.zero_grad(set_to_none=True)
        total.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lv = loss.item()
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        with torch.no_grad():
            per = tok_loss.sum(1) / (tgt != -100).sum(1).clamp(min=1)
            n_full = len(batch_seqs) - n_easy
            full_l = float(per[:n_full].mean()) if n_full else float("nan")
            easy_l = float(per[n_full:].mean()) if n_easy else float("nan")
            if args.single_turn:  # running loss per family: a plateau shows up in its own family first
                for fam, l_chat in zip(chat_fams, per.tolist()):
                    fam_ema[fam] = l_chat if fam not in fam_ema else 0.98 * fam_ema[fam] + 0.02 * l_chat
        if step % 10 == 0 or step == args.steps - 1:
            el = time.time() - t_train
            log(f"step {step:5d} loss {lv:.4f} ema {ema:.4f} full {full_l:.3f} easy {easy_l:.3f} ({n_easy}/{len(batch_seqs)}) "
                + (f"aux {aux.item():.3f} " if aux is not None else "")
                + ("cell acc " + "/".join(f"{a:.2f}" for a in cell_head.accuracy(captured["f"], batch_cells.reshape(-1, 3).to(device))) + " "
                   if aux is not None else "") +
                (("fam " + " ".join(f"{k}={v:.3f}" for k, v in sorted(fam_ema.items())) + " ") if fam_ema else "") +
                f"gnorm {float(gn):.2f} lr {lr_at(step):.2e} "
                f"{el / (step + 1):.2f}s/step elapsed {el / 60:.1f}min")
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            model.eval()
            r = task.evaluate(model, processor, n=args.probe_n, batch_size=32)
            history.append({"step": step + 1, **r})
            log("probe " + " ".join(f"{k}={v:.3f}" for k, v in r.items()))
    train_s = time.time() - t_train
    args.steps_done = steps_done  # for the card (a wall-clock budget may stop before args.steps)
    log(f"training done in {train_s / 60:.1f} min")
    if args.no_final:
        model.eval()
        r = task.evaluate(model, processor, n=args.eval_n, batch_size=32)
        log("final (unsaved) " + " ".join(f"{k}={v:.3f}" for k, v in r.items()))
        return 0

    # ---- save (fp16 storage), reload through the checked loader, score the eval split
    out_dir = Path(args.out)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.eval()
    model.to(torch.float16).save_pretrained(tmp)
    processor.save_pretrained(tmp)
    tb.write_sha256sums(tmp)
    m2, p2 = tb.load_testbed(tmp, dtype=torch.float32)
    m2.to(device)
    t_eval = time.time()
    acc = T.get_task("synthvqa").evaluate(m2, p2, n=args.eval_n, batch_size=32)
    eval_s = time.time() - t_eval
    nll = T.get_task("synthvqa-nll").evaluate(m2, p2, n=args.eval_n, batch_size=32)
    log("eval " + " ".join(f"{k}={v:.3f}" for k, v in {**acc, **nll}.items()))
    bg = float(np.mean([sv.background_patch_share(it.image) for it in sv.generate("eval", args.eval_n)]))

    size = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
    wall = time.time() - t_start
    machine = (f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} logical CPUs, "
               f"{torch.get_num_threads()} torch threads" if device.type == "cpu"
               else torch.cuda.get_device_name(0))
    card = _card(args, config, n_params, n_vis, n_img_tokens, device, machine, train_s, wall, eval_s,
                 acc, nll, bg, size, history, transformers.__version__, vision_heldout,
                 (spec_before, float(spectral_flatness_penalty([w.detach() for w in decoder_linears])), spec_random))
    (tmp / "MODEL_CARD.md").write_text(card)
    (tmp / "train_metrics.json").write_text(json.dumps(
        {"eval": {**acc, **nll}, "background_patch_share": bg, "history": history,
         "train_seconds": train_s, "wall_seconds": wall, "args": vars(args),
         "vision_heldout_cell_acc": vision_heldout}, indent=1))
    tb.write_sha256sums(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    tb.load_testbed(out_dir)  # verify the final directory
    log(f"wrote {out_dir} ({size / 1e6:.1f} MB) in {wall / 60:.1f} min total")
    return 0


def _previous_phase(args) -> str:
    """A phase continuing a checkpoint (--init-from) carries that checkpoint's training section along."""
    if not args.init_from:
        return ""
    prev = (Path(args.init_from) / "MODEL_CARD.md").read_text()
    start = prev.index("## Training") + len("## Training")
    body = prev[start:prev.index("\n## ", start)].strip()
    body = body.replace("\n### ", "\n#### ")
    return ("\nThe lines above describe the last training phase; it started from the weights of the earlier phase "
            "below (`--init-from`, with a fresh optimiser):\n\n### Earlier phase\n" + body + "\n")


def _card(args, config, n_params, n_vis, n_img_tokens, device, machine, train_s, wall, eval_s,
          acc, nll, bg, size, history, tf_version, vision_heldout=None, spectrum=(0.0, 0.0, 0.0)) -> str:
    tc, vc = config.text_config, config.vision_config
    prev_rope = getattr(args, "prev_rope", None)
    new_rope = (tuple(tc.rope_parameters["mrope_section"]), tc.rope_parameters["rope_theta"])
    rope_line = (f"\n- positions: the M-RoPE split (temporal, row, column) changed from {list(prev_rope[0])} (base "
                 f"{prev_rope[1]:g}) to {list(new_rope[0])} (base {new_rope[1]:g}) at the start of this phase; text "
                 "tokens carry equal temporal, row and column positions, so only image tokens turn differently"
                 if prev_rope is not None and prev_rope != new_rope else "")
    if args.init_from:
        vision_line = "from the earlier phase" + (
            f"; first re-trained alone for {args.vision_steps} steps of {args.vision_batch} images on the auxiliary cell loss"
            + (" with the same-shape count target added (each object token also predicts how many objects of its shape"
               " the image holds)" if args.aux_count else "") if args.vision_steps else "") + "; then " + (
            "kept frozen (its features computed once per pool image)" if args.freeze_vision
            else f"trained with the rest (auxiliary cell loss weight {args.aux_weight})")
        if args.reinit_text is not None:
            vision_line += (f"; the language model (embeddings, decoder, final norm) was **re-initialised** from "
                            f"N(0, {args.reinit_text}) and trained from scratch on this tower's features, so "
                            "nothing of the earlier decoder survives")
    else:
        vision_line = f"""{"patch embedding initialised with an orthonormal low-frequency DCT basis per colour channel; " if args.dct_init else ""}{f"pre-trained alone for {args.vision_steps} steps of {args.vision_batch} images with a per-token auxiliary loss: each merged token is scored against the LLM's word embeddings of the colour / shape / text of the grid cell under it (from the generator's scene description) and a linear head predicts the cell's grid row and column, an alignment stand-in for the pre-trained encoder and projector a real VLM starts from (word embeddings frozen in this stage); the auxiliary heads are discarded" + (f" (held-out cell accuracy on 64 calib-split scenes: colour {vision_heldout[0]:.3f}, shape {vision_heldout[1]:.3f}, text {vision_heldout[2]:.3f}, row+column {vision_heldout[3]:.3f})" if vision_heldout else "") if args.vision_steps else "trained from scratch with the rest"}{f"; the auxiliary loss stays on during QA training with weight {args.aux_weight}" if args.aux_weight else ""}"""
    rows = "\n".join(f"| {f} | {acc.get(f'acc/{f}', float('nan')):.3f} | {nll.get(f'nll/{f}', float('nan')):.3f} |"
                     for f in sv.FAMILIES)
    hist = "\n".join(f"- step {h['step']}: acc {h['acc']:.3f}" for h in history) or "- (none)"
    cmd = "python scripts/train_testbed.py " + " ".join(
        f"--{k.replace('_', '-')}" + ("" if isinstance(v, bool) else f" {v}") for k, v in vars(args).items()
        if k not in ("out", "cache", "no_final", "prepare_only", "steps_done") and v not in (False, None, ""))
    return f"""# ptqbench testbed: tiny Qwen2-VL trained on SynthVQA

A `Qwen2VLForConditionalGeneration` (the real transformers architecture: Qwen2-VL vision tower with
2D RoPE and 2x2 patch merger, GQA decoder with M-RoPE) trained **from scratch** on the procedural
SynthVQA generator (`ptqbench.data.synthvqa`). It is the default model of ptqbench: small
enough to quantize and evaluate on a CPU in seconds. It is not a general-purpose model: it only
knows SynthVQA scenes. Whether quantization error shows up as lost accuracy is measured, not
assumed: see the known limitations (added by hand after training) and
`tests/models/test_testbed_discriminates.py`.

## Architecture
- parameters: {n_params / 1e6:.2f}M ({n_vis / 1e6:.2f}M vision), stored as float16 ({size / 1e6:.1f} MB directory)
- text: hidden {tc.hidden_size}, {tc.num_hidden_layers} layers, {tc.num_attention_heads} heads / {tc.num_key_value_heads} KV heads (GQA), MLP {tc.intermediate_size}, vocab {tc.vocab_size}, tied embeddings, M-RoPE sections {tc.rope_parameters.get('mrope_section')} (temporal, row, column), base {tc.rope_parameters.get('rope_theta'):g}
- vision: {vc.depth} blocks, width {vc.embed_dim}, {vc.num_heads} heads, patch {vc.patch_size}, merge {vc.spatial_merge_size}x{vc.spatial_merge_size}
- input: {sv.SIZE}x{sv.SIZE} images (processor min_pixels = max_pixels = {sv.SIZE * sv.SIZE}) -> {(sv.SIZE // 14) ** 2} patches -> **{n_img_tokens} vision tokens** per image
- tokenizer: byte-level BPE built with `tokenizers` over the generator's text (`testbed.build_tokenizer`), Qwen special tokens, Qwen-style chat template without a default system prompt

## Training
- data: SynthVQA `train` split, data seed {args.data_seed}, pool of {args.images} pre-rendered images; each image {"has" if args.single_turn else "is a multi-turn chat with"} one question of every family in random order{f" plus one more question of each of {args.extra.replace(',', ', ')}" if args.extra else ""}{" (`where` is a training-only question: which side of the image centre one named object lies on, the lookup a spatial question makes twice; it is never evaluated)" if "where" in args.extra.split(",") else ""}{"; each question was trained as its own one-turn chat (`--single-turn`: image, instruction, question: exactly the evaluation prompt)" if args.single_turn else " (the first turn carries the image and the task instruction, exactly the evaluation prompt)"}{f"; for the first {args.focus_steps} steps only the answers of {args.focus.replace(',', ', ')} were trained (`--focus`{f', {args.focus_batch} images per step' if args.focus_batch else ''}{f', the other families rehearsed: each of their chats kept with probability {args.focus_keep} (`--focus-keep`)' if args.focus_keep else ''})" if args.focus_steps else ""}
- vision tower: {vision_line}{rope_line}
- curriculum: {f"a pool of {args.easy_images} {args.easy_objects}-object scenes (`generate_multi(..., max_objects={args.easy_objects})`) makes up a share of each batch that falls linearly from 100% to 0 over the first {args.easy_steps} steps" if args.easy_images and args.easy_steps else "none"}
- captions: {f"{args.caption_prob:.0%} of the training images get a final `describe the image.` turn answered with the generator caption" if args.caption_prob else "none"}
- loss: answer-only cross-entropy (answer tokens and the closing `<|im_end|>`; prompt, image and padding tokens are -100){f"; plus {args.spectral_reg} x a spectral-flatness penalty on every decoder matrix (`spectral_flatness_penalty`: the squared distance of its normalised Gram matrix from the identity, zero when all singular values are equal; {spectrum[0]:.2f} -> {spectrum[1]:.2f} over this phase; random Gaussian matrices of the same shapes score {spectrum[2]:.2f}){f', from step {args.spectral_from}' if args.spectral_from else ''}" if args.spectral_reg else ""}
- optimiser: AdamW (betas 0.9/0.98, weight decay {args.wd}), lr {args.lr} with {args.warmup} warm-up steps and {"then constant (`--constant-lr`)" if args.constant_lr else "cosine decay to 5%"}, grad-norm clip 1.0, {args.steps_done} steps of {args.batch} images{f" (wall-clock budget {args.max_minutes} min, schedule planned for {args.steps})" if args.max_minutes else ""}, seed {args.seed}
- command: `{cmd}`
- machine: {device.type}: {machine}; transformers {tf_version}, torch {torch.__version__}
- training time: {train_s / 60:.1f} min; total wall time (rendering, training, saving, evaluation): {wall / 60:.1f} min
{_previous_phase(args)}
## Evaluation (held-out `eval` split, seed {T.EVAL_SEED}, n={args.eval_n}, the checkpoint as stored, loaded in float32)
Greedy generation, exact match after strip/lowercase (`ptqbench.eval.tasks`, task `synthvqa`);
NLL is the mean answer-token negative log-likelihood (task `synthvqa-nll`).

| family | accuracy | answer NLL |
|---|---|---|
{rows}
| **overall** | **{acc['acc']:.3f}** | **{nll['nll']:.3f}** |

Evaluation of {args.eval_n} items took {eval_s:.1f}s on this machine.
Mean share of 14x14 patches that are pure background on these images: {bg:.3f}.

Periodic probes during training ({args.probe_n} eval items):
{hist}

## Integrity
`SHA256SUMS` lists every file; `ptqbench.models.testbed.load_testbed` verifies it before loading.
"""


if __name__ == "__main__":
    sys.exit(main())
