"""Hooks of the local lmms-eval task ``synthvqa_lmms`` and the writer of its data folder.

The task YAML (``synthvqa_lmms.yaml`` beside this file) names these functions by their full module
path, so a copy of the YAML placed anywhere finds them. :func:`materialize` writes a self-contained
include folder: the YAML (a verbatim copy), ``synthvqa_eval.jsonl`` and ``images/<id>.png``.

Prompt, answer normalisation and items are those of the built-in ``synthvqa`` task
(:mod:`ptqbench.eval.tasks`), imported rather than copied.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from PIL import Image

from ptqbench.data import synthvqa as sv
from ptqbench.eval.tasks import EVAL_SEED, normalize
from ptqbench.errors import BadInput

TASK_NAME = "synthvqa_lmms"
YAML_NAME = "synthvqa_lmms.yaml"
DATA_NAME = "synthvqa_eval.jsonl"
TEMPLATE = Path(__file__).resolve().with_name(YAML_NAME)
_DONE = ".complete"


# ----------------------------------------------------------------------------- lmms-eval hooks


def synthvqa_doc_to_visual(doc: dict) -> list[Image.Image]:
    with Image.open(doc["image"]) as im:
        return [im.convert("RGB")]


def synthvqa_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def synthvqa_process_results(doc: dict, results: list[str]) -> dict[str, float]:
    hit = float(normalize(results[0]) == normalize(doc["answer"]))
    return {"acc": hit, f"acc/{doc['family']}": hit}


# ----------------------------------------------------------------------------- data folder


def default_root() -> Path:
    """``$PTQBENCH_CACHE/lmms`` (default ``~/.cache/ptqbench/lmms``)."""
    base = os.environ.get("PTQBENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ptqbench")
    return Path(base) / "lmms"


def _fingerprint(items) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.id, it.question, it.answer, it.family, it.image.mode, list(it.image.size)]).encode())
        h.update(it.image.tobytes())
    return h.hexdigest()[:12]


def _write_yaml(folder: Path) -> None:
    """(Re)write the verbatim YAML copy atomically, so an edited template always takes effect."""
    tmp = folder / f".{YAML_NAME}.{os.getpid()}.tmp"
    shutil.copyfile(TEMPLATE, tmp)
    os.replace(tmp, folder / YAML_NAME)


def materialize(n: int, seed: int = EVAL_SEED, root: str | Path | None = None) -> Path:
    """The include folder of ``synthvqa_lmms`` over ``synthvqa.generate("eval", n, seed)``.

    The folder is keyed by a hash of the generated items (so a change of the generator never
    reuses stale data), written into a temporary sibling and renamed into place (a killed or
    concurrent writer never leaves a half-written folder). Returns the folder's absolute path.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise BadInput(f"n {n!r} is not accepted; accepted: a positive integer")
    items = sv.generate("eval", n, seed=seed)
    root = Path(root if root is not None else default_root()).expanduser().resolve()
    folder = root / f"{TASK_NAME}-eval-s{seed}-n{n}-{_fingerprint(items)}"
    if not (folder / _DONE).is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=root))
        try:
            (tmp / "images").mkdir()
            with open(tmp / DATA_NAME, "w", encoding="utf-8") as f:
                for it in items:
                    it.image.save(tmp / "images" / f"{it.id}.png", format="PNG")  # lossless: same pixels
                    rec = {"id": it.id, "image": str(folder / "images" / f"{it.id}.png"),
                           "question": it.question, "answer": it.answer, "family": it.family}
                    f.write(json.dumps(rec) + "\n")
            (tmp / _DONE).write_text("")
            try:
                os.replace(tmp, folder)
            except OSError:  # another process renamed its own copy into place first
                if not (folder / _DONE).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _write_yaml(folder)
    return folder
