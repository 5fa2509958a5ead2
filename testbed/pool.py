"""The testbed's training pool: SynthVQA `train` scenes pre-rendered once, as uint8 images and
tokenised chats with answer-only labels (prompt, image and padding tokens are -100)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ptqbench.data import synthvqa as sv
from ptqbench.eval import tasks as T

CAPTION_PROMPT = "describe the image."
N_IMAGE_TOKENS = (sv.SIZE // 14) ** 2 // 4  # 14-pixel patches, merged 2x2


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def patchify(images_u8: torch.Tensor, ip) -> torch.Tensor:
    """Qwen2-VL patch extraction for (B, 3, H, W) uint8 images already at the target size.

    Matches ``Qwen2VLImageProcessor`` (checked against it at start-up: `check_patchify`).
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


def check_patchify(processor) -> None:
    """`patchify` must give exactly what the processor gives (the eval path uses the processor)."""
    probe = sv.generate("calib", 4)
    ref = processor.image_processor(images=[it.image for it in probe], return_tensors="pt")
    mine = patchify(torch.from_numpy(np.stack([np.asarray(it.image) for it in probe])).permute(0, 3, 1, 2),
                    processor.image_processor)
    assert torch.allclose(ref["pixel_values"], mine, atol=1e-5), "patchify differs from the processor"
    assert ref["image_grid_thw"][0].tolist() == [1, sv.SIZE // 14, sv.SIZE // 14]


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


def load_pool(args, encoder: Encoder) -> dict:
    """The pool a training run asks for, from ``args.cache`` (rendered there first if missing)."""
    extra = tuple(f for f in args.extra.split(",") if f)
    tag = f"_c{args.caption_prob:g}" if args.caption_prob else ""
    tag += ("_x" + "-".join(extra)) if extra else ""
    tag += "_single" if args.single_turn else ""
    path = Path(args.cache) / f"pool_n{args.images}_s{args.data_seed}{tag}.pt"
    return build_cache(path, args.images, args.data_seed, encoder, 5, args.caption_prob, extra, args.workers,
                       singles=args.single_turn)
