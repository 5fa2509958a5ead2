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
The cache (`<runs>/.calib/calib-<key>.safetensors`) holds tensors and a JSON skeleton, never a pickle; an
entry that is damaged, foreign or from another version is discarded with one warning and recaptured.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ptqbench.engine.calib_cache import (CACHE_SUFFIX, CalibCacheError, Uncachable, read_calibration_cache,
                                         write_calibration_cache)
from ptqbench.engine.calibset import (CACHE_VERSION, MASK_KEYS, CalibBatch, CalibSet, content_hash, hash_into,
                                      one_line, short_repr)
from ptqbench.engine.chat import ProgressReporter, assistant_turn, chat_text, user_turn
from ptqbench.errors import BadInput
from ptqbench.models.adapters import Adapter, move

# Re-exported: other rooms and the tests import these from here.
__all__ = ["CACHE_VERSION", "MASK_KEYS", "CalibBatch", "CalibSet", "Sample", "build_calibration", "check_source",
           "content_hash", "load_samples", "model_fingerprint"]


@dataclass
class Sample:
    image: Any = None  # PIL image or None
    question: str | None = None
    answer: str | None = None
    text: str | None = None  # text-only sample (no chat template)


# ---- sources -------------------------------------------------------------------------------------
SOURCES_ACCEPTED = "synthvqa, synthvqa:caption, a ShareGPT4V .json/.jsonl file, or a .txt file"


def check_source(source: str, n: int, seed: int, image_root: str | None = None) -> None:
    """Validate a calibration source completely, before any model is loaded: raises BadInput for
    anything `build_calibration` would refuse. It does the same work as `load_samples` (reads the file
    and decodes every selected image, so it costs what loading them costs) and discards the result."""
    load_samples(source, n, seed, image_root)


def load_samples(source: str, n: int, seed: int, image_root: str | None = None) -> tuple[list[Sample], dict]:
    """Read `n` samples from a source; returns (samples, description for the manifest).
    Every selected record is validated and its image decoded here, so a bad input is one BadInput
    line naming the bad value, never a traceback from deep inside the capture."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise BadInput(f"calibration sample count {n!r} is not accepted; accepted: a positive integer")
    if not isinstance(source, str) or not source:
        raise BadInput(f"calibration source {source!r} is not accepted; accepted: {SOURCES_ACCEPTED}")
    # Only the exact names are the built-in set: a file called `synthvqa.json` is a file.
    if source == "synthvqa" or source.startswith("synthvqa:"):
        from ptqbench.data import synthvqa

        mode = source.partition(":")[2] or "qa"
        if mode not in ("qa", "caption"):
            raise BadInput(f"synthvqa calibration mode {mode!r} is not accepted; accepted: qa, caption")
        items = synthvqa.generate("calib", n, seed=seed)
        samples = [Sample(it.image, it.question, it.answer if mode == "qa" else it.caption) for it in items]
        return samples, {"source": source, "split": "calib", "generator_seed": seed}
    path = Path(source)
    if not path.is_file():
        raise BadInput(f"calibration source {source!r} is not a file; accepted: {SOURCES_ACCEPTED}")
    if path.suffix not in (".json", ".jsonl", ".txt"):
        raise BadInput(f"calibration file suffix {path.suffix!r} is not accepted; accepted: .json, .jsonl, .txt")
    try:
        raw = path.read_bytes()
    except OSError as e:  # permission denied, a directory behind a link, an I/O error
        raise BadInput(f"calibration file {source!r} cannot be read ({e.strerror or type(e).__name__}); "
                       "accepted: a readable file") from None
    desc = {"source": str(path), "sha256": hashlib.sha256(raw).hexdigest()}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"calibration file {source!r} is not UTF-8 text (byte {raw[e.start]:#04x} at offset "
                       f"{e.start}); accepted: a UTF-8 text or JSON file") from None
    if "\x00" in text:  # valid UTF-8 can still be a binary file; no text sample holds a NUL
        raise BadInput(f"calibration file {source!r} holds NUL bytes (a binary file); accepted: a UTF-8 text or JSON file")
    if path.suffix == ".txt":
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if not lines:
            raise BadInput(f"calibration file {source!r} is empty; accepted: a text file with one sample per line")
        random.Random(seed).shuffle(lines)
        return [Sample(text=t) for t in lines[:n]], desc

    records, where = _read_records(text, path.suffix, source)
    if image_root is not None and not Path(image_root).is_dir():
        raise BadInput(f"image root {image_root!r} is not a folder; accepted: the folder the records' image paths are relative to")
    root = Path(image_root) if image_root else path.parent
    # MBQ shuffles the ShareGPT4V list with a seed. Shuffling the indices gives the same permutation
    # (it depends on the length only) and keeps each record's place in the file for error messages.
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [_sharegpt_sample(records[i], root, source, where[i]) for i in order[:n]], desc


def _read_records(text: str, suffix: str, source: str) -> tuple[list, list[str]]:
    """The records of a ShareGPT4V JSON list or JSONL file, and where each one is (for messages)."""
    accepted = "accepted: ShareGPT4V JSON (a list of records) or JSONL (one record per line)"
    if suffix == ".jsonl":
        records, where = [], []
        # split on "\n" only: str.splitlines would also cut at U+2028 etc., which JSON strings may hold raw
        for i, ln in enumerate(text.split("\n"), 1):
            if not ln.strip():
                continue
            try:
                records.append(json.loads(ln))
            except json.JSONDecodeError as e:
                raise BadInput(f"calibration file {source!r} line {i} is not JSON ({e.msg}, column {e.colno}); {accepted}") from None
            where.append(f"line {i}")
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadInput(f"calibration file {source!r} is not readable JSON ({e}); {accepted}") from None
        if not isinstance(records, list):
            raise BadInput(f"calibration file {source!r} holds a JSON {type(records).__name__}, not a list; {accepted}")
        where = [f"record [{i}]" for i in range(len(records))]
    if not records:
        raise BadInput(f"calibration file {source!r} holds no records; accepted: a non-empty ShareGPT4V list")
    return records, where


def _sharegpt_sample(rec, root: Path, source: str, where: str = "a record") -> Sample:
    from PIL import Image

    at = f"{where} of {source!r}"
    record = "accepted: a ShareGPT4V record, an object with 'conversations' (a list of {from, value} objects) and an optional 'image' path"
    if not isinstance(rec, dict):
        raise BadInput(f"{at} is {short_repr(rec)}, not an object; {record}")
    conv = rec.get("conversations")
    if not isinstance(conv, list):
        raise BadInput(f"{at}: conversations {short_repr(conv)} is not a list; {record}")
    for j, c in enumerate(conv):
        if not isinstance(c, dict):
            raise BadInput(f"{at}: conversations[{j}] is {short_repr(c)}, not an object; {record}")
        if not isinstance(c.get("value"), str):
            raise BadInput(f"{at}: conversations[{j}] value {short_repr(c.get('value'))} is not a string; {record}")
    human = next((c["value"] for c in conv if c.get("from") == "human"), None)
    gpt = next((c["value"] for c in conv if c.get("from") == "gpt"), None)
    if human is None or gpt is None:
        raise BadInput(f"{at} (id {short_repr(rec.get('id', '?'))}) lacks a human or a gpt turn; {record}")
    image = None
    name = rec.get("image")
    if name is not None and name != "":  # absent, null or "": a text-only conversation
        if not isinstance(name, str):
            raise BadInput(f"{at}: image {short_repr(name)} is not accepted; accepted: an image file path (a string) "
                           "relative to the image folder")
        ipath = root / name
        if not ipath.is_file():
            raise BadInput(f"{at}: image {name!r} does not exist (looked for {str(ipath)!r}); accepted: an image "
                           "file under the image folder (--image-root, default: the file's folder)")
        try:
            with Image.open(ipath) as im:
                image = im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
            raise BadInput(f"{at}: image {str(ipath)!r} cannot be decoded ({type(e).__name__}); accepted: a readable "
                           "PNG/JPEG file") from None
    return Sample(image, human.replace("<image>", "").strip(), gpt.strip())


# ---- encoding ------------------------------------------------------------------------------------
def _messages(s: Sample, with_answer: bool) -> list[dict]:
    msgs = [user_turn(s.question, 1 if s.image is not None else 0)]
    if with_answer:
        msgs.append(assistant_turn(s.answer))
    return msgs


def _texts(processor, s: Sample) -> tuple[str, str | None, str | None]:
    """(full conversation, prompt with the generation prompt, prompt without it); text-only: (text, None, None)."""
    if s.text is not None:
        return s.text, None, None
    full = chat_text(processor, _messages(s, True))
    prompt = chat_text(processor, _messages(s, False), add_generation_prompt=True)
    question = chat_text(processor, _messages(s, False), add_generation_prompt=False)
    if not full.startswith(prompt):
        raise RuntimeError("the chat template's generation prompt is not a prefix of the full conversation")
    if not prompt.startswith(question):
        raise RuntimeError("the chat template's prompt without the generation prompt is not a prefix of the prompt with it")
    return full, prompt, question


def _encode(processor, texts: list[str], images: list, padding_side: str = "left") -> dict:
    """A processor batch on the CPU (captured there, moved by the caller). Unlike `chat.encode_left`,
    each sample has its own image list (empty for a text-only sample in a mixed batch), and the side
    is set on the tokenizer, as the sets cached so far were encoded."""
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


def _fit_samples(processor, samples: list[Sample], seq_len: int) -> tuple[list[tuple], int]:
    """(full text, image, answer tokens, reply tokens) of every sample that fits `seq_len` tokens, and
    how many were dropped. A text-only sample is truncated; one with an image is dropped (never cut
    an image: VLMQ's rule)."""
    encoded, dropped = [], 0
    for s in samples:
        full, prompt, question = _texts(processor, s)
        L = _length(processor, full, s.image)
        if L > seq_len:
            if s.text is not None:  # text-only: truncate by tokens
                tok = getattr(processor, "tokenizer", processor)
                full = tok.decode(tok(full)["input_ids"][:seq_len])
                L = _length(processor, full, None)
            else:
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
    return encoded, dropped


# ---- capture -------------------------------------------------------------------------------------
def _cache_key(fingerprint: str, desc: dict, n: int, seq_len: int, seed: int, batch_size: int, vision: bool,
               dtype: torch.dtype) -> str:
    """Everything that decides the captured tensors, hashed: the name of the set's cache entry."""
    return hashlib.sha256(json.dumps(dict(v=CACHE_VERSION, model=fingerprint, data=desc, n=n,
                                          seq_len=seq_len, seed=seed, batch=batch_size, vision=vision,
                                          dtype=str(dtype)), sort_keys=True).encode()).hexdigest()[:20]


def _read_cache(cache: Path | None, key: str, warn: Callable[[str], None]) -> CalibSet | None:
    """The cached set, or None when there is none or it was discarded (with one warning)."""
    if cache is None or not cache.is_file():
        return None
    try:
        return read_calibration_cache(cache, key)
    except CalibCacheError as e:
        warn(f"calibration cache {str(cache)!r} discarded ({e}); capturing the set again")
        return None


def _write_cache(cs: CalibSet, cache: Path | None, warn: Callable[[str], None]) -> None:
    if cache is None:
        return
    try:
        write_calibration_cache(cs, cache)
    except Uncachable as e:
        warn(f"calibration cache not written: {e}; the set is captured again on every run")
    except Exception as e:  # noqa: BLE001 - full disk, unwritable folder: costs a recapture next time, not this run
        warn(f"calibration cache {str(cache)!r} not written ({type(e).__name__}: {one_line(e)})")


def _text_masks(ids: torch.Tensor, valid: torch.Tensor, chunk: list[tuple], vision_ids: torch.Tensor) -> dict:
    """The per-token masks (MASK_KEYS) of one left-padded batch."""
    answer, reply = torch.zeros_like(valid), torch.zeros_like(valid)
    T = ids.shape[1]
    for i, (_, _, ans, n_reply) in enumerate(chunk):
        answer[i, T - ans:] = True  # left padding: the answer is the last `ans` tokens
        reply[i, T - n_reply:] = True  # the assistant turn (generation prompt + answer): the last `n_reply`
    answer &= valid
    reply &= valid
    vis = torch.isin(ids, vision_ids) & valid
    return {"valid": valid, "vision": vis, "text": valid & ~vis, "answer": answer, "reply": reply}


def _vision_batch(adapter: Adapter, inputs: dict, device) -> CalibBatch:
    """A second pass that records every vision block's own call arguments."""
    vh, calls = adapter.capture_vision(move(inputs, device))
    ones = torch.ones(vh.shape[:-1], dtype=torch.bool)
    return CalibBatch(vh.detach().cpu(), {"vision_calls": move(calls, "cpu")}, {}, torch.zeros(0, dtype=torch.long),
                      {"valid": ones, "vision": ones, "text": ~ones, "answer": ~ones, "reply": ~ones})


def _capture(model, adapter: Adapter, processor, encoded: list[tuple], batch_size: int, vision: bool,
             progress) -> tuple[list[CalibBatch], list[CalibBatch]]:
    """Run the model up to decoder layer 0 (and, with `vision`, through the vision tower) batch by batch."""
    device = next(model.parameters()).device
    vision_ids = torch.tensor(adapter.vision_token_ids())
    batches: list[CalibBatch] = []
    vision_batches: list[CalibBatch] = []
    chunks = [encoded[i:i + batch_size] for i in range(0, len(encoded), batch_size)]
    bar = ProgressReporter(progress, "capture calibration", len(chunks))
    for chunk in chunks:
        inputs = _encode(processor, [c[0] for c in chunk], [c[1] for c in chunk])
        ids = inputs["input_ids"]
        valid = inputs.get("attention_mask", torch.ones_like(ids)).bool()
        masks = _text_masks(ids, valid, chunk, vision_ids)
        hidden, kwargs, extras = adapter.capture(move(inputs, device))
        if vision:
            vision_batches.append(_vision_batch(adapter, inputs, device))
        batches.append(CalibBatch(hidden.cpu(), move(kwargs, "cpu"), move(extras, "cpu"), ids.cpu(), masks,
                                  inputs=move(inputs, "cpu") if vision else None))
        bar.advance(1)
    return batches, vision_batches


def _background_share(encoded: list[tuple]) -> float | None:
    """How redundant the vision tokens are: the mean share of 14x14 image patches that are pure background."""
    from ptqbench.data.synthvqa import background_patch_share

    images = [c[1] for c in encoded if c[1] is not None]
    return float(sum(background_patch_share(im) for im in images) / len(images)) if images else None


def build_calibration(model, adapter: Adapter, processor, source: str, n: int, seq_len: int, seed: int,
                      batch_size: int = 4, image_root: str | None = None, cache_dir: str | Path | None = None,
                      progress=None, vision: bool = False, warn: Callable[[str], None] | None = None) -> CalibSet:
    """Capture (or load from `cache_dir`) the calibration set for this model and data.

    `warn` gets one line when a cache entry is discarded (damaged, foreign, outdated) or cannot be
    written; default: printed to stderr. The set is then captured as if there were no cache."""
    if not isinstance(seq_len, int) or seq_len < 8:
        raise BadInput(f"sequence length {seq_len!r} is not accepted; accepted: an integer >= 8")
    warn = warn or _print_stderr
    samples, desc = load_samples(source, n, seed, image_root)
    fingerprint = model_fingerprint(model)
    key = _cache_key(fingerprint, desc, n, seq_len, seed, batch_size, vision, next(model.parameters()).dtype)
    # Entries of earlier versions (`calib-*.pt`, pickles) have another name and are never opened.
    cache = Path(cache_dir) / f"calib-{key}{CACHE_SUFFIX}" if cache_dir else None
    cached = _read_cache(cache, key, warn)
    if cached is not None:
        return cached

    encoded, dropped = _fit_samples(processor, samples, seq_len)
    batches, vision_batches = _capture(model, adapter, processor, encoded, batch_size, vision, progress)
    counts = {k: int(sum(b.masks[k].sum() for b in batches)) for k in MASK_KEYS}
    manifest = dict(desc, n_requested=n, n_samples=len(encoded), n_dropped=dropped, seq_len=seq_len, seed=seed,
                    batch_size=batch_size, tokens=counts, model=fingerprint, cache_key=key,
                    background_patch_share=_background_share(encoded))
    cs = CalibSet(batches, manifest, vision_batches)
    manifest["content_hash"] = cs.compute_hash()
    _write_cache(cs, cache, warn)
    return cs


def _without_paths(config: dict) -> dict:
    """A config without the folder it was loaded from (transformers records it as `_name_or_path`)."""
    return {k: _without_paths(v) if isinstance(v, dict) else v for k, v in config.items() if k != "_name_or_path"}


def model_fingerprint(model) -> str:
    """Identity of a model for cache keys: every parameter for small models, config + files for big ones."""
    h = hashlib.sha256(json.dumps(_without_paths(json.loads(model.config.to_json_string(use_diff=False))),
                                  sort_keys=True).encode())
    h.update(f":{getattr(model, '_ptq_random_seed', '')}".encode())
    n_params = sum(p.numel() for p in model.parameters())
    if n_params <= 50_000_000:  # the content is the identity: a moved or freshly cloned checkout keeps its cells
        for name, p in model.state_dict().items():
            h.update(name.encode())
            hash_into(h, p)
    else:  # too big to hash each run: where its files are, their sizes and times
        h.update(str(getattr(model.config, "_name_or_path", "")).encode())
        h.update(f"{getattr(model, 'name_or_path', '')}".encode())
        d = Path(str(getattr(model.config, "_name_or_path", "")))
        for f in sorted(d.glob("*.safetensors")) if d.is_dir() else []:
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _print_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
