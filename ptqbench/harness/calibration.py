"""Calibration sets: captured once per (model, data, n, seq len, seed), content-hashed, cached on disk,
and handed identically to every method.

A calibration set is the input of the first decoder layer for every sample (plus the kwargs the layers
take), with per-token masks:
  valid  – not padding;   vision – an image/video placeholder token (from the adapter's token ids,
  after the processor expanded the pads);   text – valid and not vision;
  answer – the assistant's reply text (everything after the chat template's generation prompt, e.g.
  after `<|im_start|>assistant\n`: the answer and the template's closing tokens);
  reply  – the whole assistant turn from its opening token: the generation prompt's tokens (e.g.
  `<|im_start|>assistant\n`) plus `answer`. This is the reference MBQ's supervised set (its labels are
  -100 up to the last `<|im_start|>`, thu-nics/MBQ `qmllm/models/qwen2_vl/qwen2_vl.py`).
Both are computed per sample from token lengths of the rendered template (never by searching for a
token id), and never cover padding.
Sources: the built-in synthetic set (`synthvqa`, `synthvqa:caption`), a ShareGPT4V JSON/JSONL file with
a local image folder, or a text-only file (.txt, one sample per non-empty line; every token counts as
answer and reply, as in GPTQ's text calibration).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ptqbench.errors import BadInput
from ptqbench.harness.adapters import Adapter, move

CACHE_VERSION = 2  # 2: masks gained `reply`
MASK_KEYS = ("valid", "vision", "text", "answer", "reply")


@dataclass
class Sample:
    image: Any = None  # PIL image or None
    question: str | None = None
    answer: str | None = None
    text: str | None = None  # text-only sample (no chat template)


@dataclass
class CalibBatch:
    hidden: torch.Tensor  # (B, T, D) input of decoder layer 0
    kwargs: dict  # replay kwargs for the decoder layers
    extras: dict  # adapter-specific state (e.g. Qwen3-VL deepstack features)
    input_ids: torch.Tensor  # (B, T)
    masks: dict[str, torch.Tensor]  # valid / vision / text / answer / reply, bool (B, T)
    inputs: dict | None = None  # the processor batch, kept when the vision tower is calibrated too


@dataclass
class CalibSet:
    batches: list[CalibBatch]
    manifest: dict = field(default_factory=dict)
    vision_batches: list[CalibBatch] = field(default_factory=list)  # inputs of vision-tower block 0

    @property
    def hash(self) -> str:
        return self.manifest["content_hash"]

    def __len__(self) -> int:
        return sum(b.hidden.shape[0] for b in self.batches)


# ---- sources -------------------------------------------------------------------------------------
def load_samples(source: str, n: int, seed: int, image_root: str | None = None) -> tuple[list[Sample], dict]:
    """Read `n` samples from a source; returns (samples, description for the manifest)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise BadInput(f"calibration sample count {n!r} is not accepted; accepted: a positive integer")
    if source.startswith("synthvqa"):
        from ptqbench.benchmarks import synthvqa

        mode = source.partition(":")[2] or "qa"
        if mode not in ("qa", "caption"):
            raise BadInput(f"synthvqa calibration mode {mode!r} is not accepted; accepted: qa, caption")
        items = synthvqa.generate("calib", n, seed=seed)
        samples = [Sample(it.image, it.question, it.answer if mode == "qa" else it.caption) for it in items]
        return samples, {"source": source, "split": "calib", "generator_seed": seed}
    path = Path(source)
    if not path.is_file():
        raise BadInput(f"calibration source {source!r} is not a file; accepted: synthvqa, synthvqa:caption, a ShareGPT4V .json/.jsonl, or a .txt file")
    raw = path.read_bytes()
    desc = {"source": str(path), "sha256": hashlib.sha256(raw).hexdigest()}
    if path.suffix == ".txt":
        lines = [ln.strip() for ln in raw.decode("utf-8", errors="strict").splitlines() if ln.strip()]
        if not lines:
            raise BadInput(f"calibration file {source!r} is empty; accepted: a text file with one sample per line")
        random.Random(seed).shuffle(lines)
        return [Sample(text=t) for t in lines[:n]], desc
    if path.suffix not in (".json", ".jsonl"):
        raise BadInput(f"calibration file suffix {path.suffix!r} is not accepted; accepted: .json, .jsonl, .txt")
    try:
        text = raw.decode("utf-8")
        records = [json.loads(ln) for ln in text.splitlines() if ln.strip()] if path.suffix == ".jsonl" else json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"calibration file {source!r} is not readable JSON ({e}); accepted: ShareGPT4V JSON or JSONL") from None
    if not isinstance(records, list) or not records:
        raise BadInput(f"calibration file {source!r} holds no records; accepted: a non-empty ShareGPT4V list")
    root = Path(image_root) if image_root else path.parent
    random.Random(seed).shuffle(records)  # MBQ shuffles the ShareGPT4V list with a seed
    return [_sharegpt_sample(r, root, source) for r in records[:n]], desc


def _sharegpt_sample(rec: dict, root: Path, source: str) -> Sample:
    from PIL import Image, UnidentifiedImageError

    conv = rec.get("conversations") if isinstance(rec, dict) else None
    if not conv or len(conv) < 2:
        raise BadInput(f"record {rec.get('id', '?') if isinstance(rec, dict) else rec!r} in {source!r} has no human/gpt conversation; accepted: ShareGPT4V records")
    human = next((c["value"] for c in conv if c.get("from") == "human"), None)
    gpt = next((c["value"] for c in conv if c.get("from") == "gpt"), None)
    if human is None or gpt is None:
        raise BadInput(f"record {rec.get('id', '?')!r} in {source!r} lacks a human or gpt turn")
    image = None
    if rec.get("image"):
        ipath = root / rec["image"]
        try:
            with Image.open(ipath) as im:
                image = im.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise BadInput(f"image {str(ipath)!r} cannot be decoded ({type(e).__name__}); accepted: a readable PNG/JPEG file") from None
    return Sample(image, human.replace("<image>", "").strip(), gpt.strip())


# ---- encoding ------------------------------------------------------------------------------------
def _messages(s: Sample, with_answer: bool) -> list[dict]:
    content = ([{"type": "image"}] if s.image is not None else []) + [{"type": "text", "text": s.question}]
    msgs = [{"role": "user", "content": content}]
    if with_answer:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": s.answer}]})
    return msgs


def _texts(processor, s: Sample) -> tuple[str, str | None, str | None]:
    """(full conversation, prompt with the generation prompt, prompt without it); text-only: (text, None, None)."""
    if s.text is not None:
        return s.text, None, None
    full = processor.apply_chat_template(_messages(s, True), tokenize=False)
    prompt = processor.apply_chat_template(_messages(s, False), tokenize=False, add_generation_prompt=True)
    question = processor.apply_chat_template(_messages(s, False), tokenize=False, add_generation_prompt=False)
    if not full.startswith(prompt):
        raise RuntimeError("the chat template's generation prompt is not a prefix of the full conversation")
    if not prompt.startswith(question):
        raise RuntimeError("the chat template's prompt without the generation prompt is not a prefix of the prompt with it")
    return full, prompt, question


def _encode(processor, texts: list[str], images: list, padding_side: str = "left") -> dict:
    kw: dict[str, Any] = dict(text=texts, return_tensors="pt", padding=True)
    if any(im is not None for im in images):
        kw["images"] = [[im] if im is not None else [] for im in images]
    tok = getattr(processor, "tokenizer", processor)
    old = tok.padding_side
    tok.padding_side = padding_side  # MBQ left-pads; masks make the side irrelevant to statistics
    try:
        return dict(processor(**kw))
    finally:
        tok.padding_side = old


def _length(processor, text: str, image) -> int:
    return int(_encode(processor, [text], [image])["input_ids"].shape[1])


# ---- capture -------------------------------------------------------------------------------------
def build_calibration(model, adapter: Adapter, processor, source: str, n: int, seq_len: int, seed: int,
                      batch_size: int = 4, image_root: str | None = None, cache_dir: str | Path | None = None,
                      progress=None, vision: bool = False) -> CalibSet:
    """Capture (or load from cache) the calibration set for this model and data."""
    if not isinstance(seq_len, int) or seq_len < 8:
        raise BadInput(f"sequence length {seq_len!r} is not accepted; accepted: an integer >= 8")
    samples, desc = load_samples(source, n, seed, image_root)
    fingerprint = model_fingerprint(model)
    key = hashlib.sha256(json.dumps(dict(v=CACHE_VERSION, model=fingerprint, data=desc, n=n,
                                         seq_len=seq_len, seed=seed, batch=batch_size, vision=vision,
                                         dtype=str(next(model.parameters()).dtype)), sort_keys=True).encode()).hexdigest()[:20]
    cache = Path(cache_dir) / f"calib-{key}.pt" if cache_dir else None
    if cache is not None and cache.is_file():
        data = torch.load(cache, weights_only=False)
        loaded = CalibSet([CalibBatch(**b) for b in data["batches"]], data["manifest"],
                          [CalibBatch(**b) for b in data.get("vision_batches", [])])
        # An entry written before a mask existed (e.g. `reply`) is recaptured and overwritten, not used.
        if all(k in b.masks for b in loaded.batches + loaded.vision_batches for k in MASK_KEYS):
            return loaded

    encoded, dropped = [], 0
    for s in samples:
        full, prompt, question = _texts(processor, s)
        L = _length(processor, full, s.image)
        if L > seq_len:
            if s.text is not None:  # text-only: truncate by tokens
                tok = getattr(processor, "tokenizer", processor)
                full = tok.decode(tok(full)["input_ids"][:seq_len])
                L = _length(processor, full, None)
            else:  # never cut an image: drop the sample (VLMQ's rule)
                dropped += 1
                continue
        if prompt is None:
            ans = reply = L
        else:
            ans = L - _length(processor, prompt, s.image)  # after the generation prompt
            reply = L - _length(processor, question, s.image)  # the generation prompt's tokens too
        encoded.append((full, s.image, ans, reply))
    if not encoded:
        raise BadInput(f"no calibration sample fits sequence length {seq_len} ({dropped} dropped); accepted: a larger --seq-len")

    device = next(model.parameters()).device
    vision_ids = torch.tensor(adapter.vision_token_ids())
    batches: list[CalibBatch] = []
    vision_batches: list[CalibBatch] = []
    chunks = [encoded[i:i + batch_size] for i in range(0, len(encoded), batch_size)]
    task = progress.add_task("capture calibration", total=len(chunks)) if progress else None
    for chunk in chunks:
        inputs = _encode(processor, [c[0] for c in chunk], [c[1] for c in chunk])
        ids = inputs["input_ids"]
        valid = inputs.get("attention_mask", torch.ones_like(ids)).bool()
        answer, reply = torch.zeros_like(valid), torch.zeros_like(valid)
        T = ids.shape[1]
        for i, (_, _, ans, n_reply) in enumerate(chunk):
            answer[i, T - ans:] = True  # left padding: the answer is the last `ans` tokens
            reply[i, T - n_reply:] = True  # the assistant turn (generation prompt + answer): the last `n_reply`
        answer &= valid
        reply &= valid
        vis = torch.isin(ids, vision_ids) & valid
        hidden, kwargs, extras = adapter.capture(move(inputs, device))
        if vision:  # a second pass records every vision block's own call arguments
            vh, calls = adapter.capture_vision(move(inputs, device))
            ones = torch.ones(vh.shape[:-1], dtype=torch.bool)
            vision_batches.append(CalibBatch(vh.detach().cpu(), {"vision_calls": move(calls, "cpu")}, {},
                                             torch.zeros(0, dtype=torch.long),
                                             {"valid": ones, "vision": ones, "text": ~ones, "answer": ~ones,
                                              "reply": ~ones}))
        batches.append(CalibBatch(hidden.cpu(), move(kwargs, "cpu"), move(extras, "cpu"), ids.cpu(),
                                  {"valid": valid, "vision": vis, "text": valid & ~vis, "answer": answer,
                                   "reply": reply},
                                  inputs=move(inputs, "cpu") if vision else None))
        if progress:
            progress.advance(task)

    counts = {k: int(sum(b.masks[k].sum() for b in batches)) for k in MASK_KEYS}
    # How redundant the vision tokens are: the share of 14x14 image patches that are pure background.
    from ptqbench.benchmarks.synthvqa import background_patch_share

    images = [c[1] for c in encoded if c[1] is not None]
    bg = float(sum(background_patch_share(im) for im in images) / len(images)) if images else None
    manifest = dict(desc, n_requested=n, n_samples=len(encoded), n_dropped=dropped, seq_len=seq_len, seed=seed,
                    batch_size=batch_size, tokens=counts, model=fingerprint, cache_key=key,
                    background_patch_share=bg)
    manifest["content_hash"] = content_hash(batches + vision_batches)
    cs = CalibSet(batches, manifest, vision_batches)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save({"batches": [b.__dict__ for b in batches], "manifest": manifest,
                    "vision_batches": [b.__dict__ for b in vision_batches]}, tmp)
        tmp.replace(cache)  # atomic: a killed capture never leaves a half-written cache entry
    return cs


def _hash_obj(h, obj) -> None:
    if isinstance(obj, torch.Tensor) and obj.is_meta:  # a lazily built block: identified by its seed (fingerprint)
        h.update(f"meta{obj.dtype}{tuple(obj.shape)}".encode())
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        for k in sorted(obj):
            h.update(str(k).encode())
            _hash_obj(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _hash_obj(h, v)
    else:
        h.update(repr(obj).encode())


def content_hash(batches: list[CalibBatch]) -> str:
    h = hashlib.sha256()
    for b in batches:
        _hash_obj(h, [b.hidden, b.input_ids, b.masks, b.kwargs, b.extras])
    return h.hexdigest()[:16]


def model_fingerprint(model) -> str:
    """Identity of a model for cache keys: every parameter for small models, config + files for big ones."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    h.update(str(getattr(model.config, "_name_or_path", "")).encode())
    h.update(f"{getattr(model, 'name_or_path', '')}:{getattr(model, '_ptq_random_seed', '')}".encode())
    n_params = sum(p.numel() for p in model.parameters())
    if n_params <= 50_000_000:
        for name, p in model.state_dict().items():
            h.update(name.encode())
            _hash_obj(h, p)
    else:
        d = Path(str(getattr(model.config, "_name_or_path", "")))
        for f in sorted(d.glob("*.safetensors")) if d.is_dir() else []:
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]
