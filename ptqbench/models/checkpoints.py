"""Checkpoint folders before they are loaded: SHA256SUMS, no pickled weights, parseable files.

A checkpoint directory (or a hub id resolved to its snapshot folder in the local cache) is checked before
anything is loaded: its `SHA256SUMS`, when present, must match every file; its weights must be safetensors
(pickled `.bin`/`.pt`/`.pth` weights only with `allow_pickle`); its JSON files and safetensors headers
must parse. models.load_model then passes `trust_remote_code=False` to every `from_pretrained`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from ptqbench.errors import BadInput

ACCEPTED = ("testbed, tiny:<family>, random:<config.json or dir>[@<image side>], a local checkpoint directory, "
            "or a hub id already in the local cache")
SUMS_NAME = "SHA256SUMS"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")  # torch.load / pickle files
PICKLE_FLAG = "--allow-pickle"
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
_MAX_JSON = 256 * 2**20  # larger .json files are left to their loader
_RACY_NS = 2 * 10**9  # files changed this close to a verification are hashed again (timestamp granularity)
INTACT = "an intact checkpoint (download or save it again)"


def first_line(e: BaseException) -> str:
    """An exception's message on one line (whitespace collapsed), at most 200 characters."""
    text = " ".join(str(e).split())
    if isinstance(e, KeyError):
        text = f"missing key {text}"
    text = text or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# ---- integrity: SHA256SUMS -------------------------------------------------------------------------

def sha256_file(path) -> str:
    """SHA-256 of a file, streamed in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_sha256sums(directory) -> Path:
    """Write ``SHA256SUMS`` (``sha256sum`` format) over every regular file in ``directory``."""
    d = Path(directory)
    files = sorted(p for p in d.iterdir() if p.is_file() and p.name != SUMS_NAME and not p.name.startswith("."))
    out = d / SUMS_NAME
    out.write_text("".join(f"{sha256_file(p)}  {p.name}\n" for p in files))
    return out


# realpath -> (signature of the directory's files, time the verification started)
_verified: dict[str, tuple[tuple, int]] = {}


def _dir_signature(d: Path, listed) -> tuple[tuple, int]:
    """(inode, size, mtime, ctime) of the directory's files and of the listed ones, and the newest time."""
    names = sorted({p.name for p in d.iterdir()} | set(listed))
    sig, newest = [], 0
    for n in names:
        try:
            st = os.stat(d / n)
        except OSError:
            sig.append((n, None))
            continue
        sig.append((n, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        newest = max(newest, st.st_mtime_ns, st.st_ctime_ns)
    return tuple(sig), newest


def verify_checkpoint_sums(directory, what: str = "checkpoint file", required: bool = False,
                           fix: str = "the file as published, or write SHA256SUMS again if the change is yours") -> bool:
    """Check a directory's files against its ``SHA256SUMS`` (``sha256sum`` format, names relative to it).

    BadInput naming the first `what` (e.g. "checkpoint file '<path>'") that is altered, missing, or present
    but not listed, or the malformed line. Without SHA256SUMS: BadInput when `required`, else False. True
    once verified. A directory verified earlier in this process is not hashed again while none of its files
    changed (same inode, size, mtime and ctime, and none modified within 2 s of that verification)."""
    d = Path(directory)
    sums = d / SUMS_NAME
    if not sums.is_file():
        if required:
            raise BadInput(f"{what} {str(sums)!r} is missing; accepted: a directory with {SUMS_NAME}")
        return False
    start = time.time_ns()
    listed: dict[str, str] = {}
    for n, line in enumerate(sums.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(None, 1)
        if len(parts) != 2 or len(parts[0]) != 64 or any(c not in "0123456789abcdefABCDEF" for c in parts[0]):
            raise BadInput(f"{SUMS_NAME} line {n} {line[:120]!r} of {str(d)!r} is not accepted; accepted: '<sha256>  <file>'")
        rel = Path(parts[1].strip().lstrip("*"))
        if rel.is_absolute() or ".." in rel.parts or rel.as_posix() in (".", ""):
            raise BadInput(f"{SUMS_NAME} line {n} of {str(d)!r} names {rel.as_posix()!r}, not a file inside the "
                           f"directory; accepted: '<sha256>  <file name relative to the directory>'")
        listed[rel.as_posix()] = parts[0].lower()
    key = os.path.realpath(d)
    sig, newest = _dir_signature(d, listed)
    cached = _verified.get(key)
    if cached is not None and cached[0] == sig and newest < cached[1] - _RACY_NS:
        return True
    for p in sorted(d.iterdir()):
        if p.is_file() and p.name != SUMS_NAME and not p.name.startswith(".") and p.name not in listed:
            raise BadInput(f"{what} {str(p)!r} is not listed in {SUMS_NAME}; accepted: listed files only")
    for name, digest in listed.items():
        p = d / name
        if not p.is_file():
            raise BadInput(f"{what} {str(p)!r} is missing; accepted: the files listed in {SUMS_NAME}")
        if sha256_file(p) != digest:
            raise BadInput(f"{what} {str(p)!r} does not match its SHA256 in {SUMS_NAME}; accepted: an unmodified file ({fix})")
    _verified[key] = (sig, start)
    return True


# ---- pre-flight checks of a model source -----------------------------------------------------------

def json_file(p: Path, what: str = "checkpoint file"):
    try:
        with open(p, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise BadInput(f"{what} {str(p)!r} is not valid JSON ({first_line(e)}); accepted: {INTACT}") from None


def _check_safetensors_header(p: Path) -> None:
    """The 8-byte header length, the JSON header and the tensors' extent, read without loading a tensor."""
    def bad(why: str) -> BadInput:
        return BadInput(f"checkpoint file {str(p)!r} is not a valid safetensors file ({why}); accepted: {INTACT}")

    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, _MAX_HEADER):
                raise bad(f"header length {n} does not fit in the file's {size} bytes")
            raw = f.read(n)
    except OSError as e:
        raise BadInput(f"checkpoint file {str(p)!r} cannot be read ({first_line(e)}); accepted: {INTACT}") from None
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise bad("its JSON header does not parse") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        offs = v.get("data_offsets") if isinstance(v, dict) else None
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int and o >= 0 for o in offs)
                and offs[0] <= offs[1]):
            raise bad(f"tensor {k[:80]!r} has no valid data_offsets")
        end = max(end, offs[1])
    if 8 + n + end != size:
        raise bad(f"its tensors span {end} bytes but {size - 8 - n} follow the header: truncated or padded")


def weight_files(d: Path) -> tuple[list[Path], list[Path]]:
    """(the safetensors files transformers loads, in its order of preference; the pickled weight files)."""
    pickled = sorted(p for p in d.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))
    if (d / SAFE_WEIGHTS).is_file():
        return [d / SAFE_WEIGHTS], pickled
    index = d / SAFE_INDEX
    if not index.is_file():
        return [], pickled
    wm = json_file(index)
    wm = wm.get("weight_map") if isinstance(wm, dict) else None
    if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
        raise BadInput(f"checkpoint file {str(index)!r} has no weight_map of tensor names to files; accepted: {INTACT}")
    safe = []
    for fname in sorted(set(wm.values())):
        rel = Path(fname)
        if rel.is_absolute() or ".." in rel.parts or not fname.endswith(".safetensors"):
            raise BadInput(f"checkpoint file {str(index)!r} names {fname[:120]!r}; accepted: .safetensors files inside {str(d)!r}")
        if not (d / rel).is_file():
            raise BadInput(f"checkpoint file {str(d / rel)!r} listed in {SAFE_INDEX} is missing; accepted: {INTACT}")
        safe.append(d / rel)
    return safe, pickled


def checkpoint_dir(name: str) -> Path:
    """A local checkpoint directory, or a hub id's snapshot folder in the local cache (no network)."""
    if os.path.isdir(name):
        return Path(name)
    if os.path.exists(name):
        raise BadInput(f"model {name!r} is a file, not a checkpoint directory; accepted: {ACCEPTED}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except (OSError, ValueError):  # not in the cache (LocalEntryNotFoundError), not a repo id (HFValidationError)
        raise BadInput(f"model {name!r} is neither a local directory nor a hub id in the local cache; "
                       f"accepted: {ACCEPTED}") from None


def check_checkpoint(name: str, d: Path, allow_pickle: bool) -> bool:
    """Pre-flight checks of a checkpoint directory; True when its weights are safetensors."""
    from ptqbench.models.adapters import supported_model_types

    where = name if os.path.realpath(name) == os.path.realpath(d) else f"{name} ({d})"
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise BadInput(f"checkpoint {where!r} has no config.json; accepted: {ACCEPTED}")
    verify_checkpoint_sums(d)
    for p in sorted(d.glob("*.json")):  # config, index, tokenizer, processor: each parses before a loader reads it
        if p.is_file() and p.stat().st_size <= _MAX_JSON:
            json_file(p)
    config = json_file(cfg_path)
    if not isinstance(config, dict):
        raise BadInput(f"checkpoint file {str(cfg_path)!r} is not a JSON object; accepted: {INTACT}")
    model_type = config.get("model_type")
    if model_type is not None and model_type not in supported_model_types():
        raise BadInput(f"model type {model_type!r} of {name!r} is not supported; accepted: {', '.join(supported_model_types())}")
    safe, pickled = weight_files(d)
    if safe:
        for p in safe:
            _check_safetensors_header(p)
        return True
    if pickled:
        if not allow_pickle:
            raise BadInput(f"checkpoint {where!r} holds only pickled weights ({', '.join(p.name for p in pickled[:3])}), "
                           f"which can run code when loaded: pickled weights are refused; accepted: a checkpoint with "
                           f"safetensors weights, or {PICKLE_FLAG} for a checkpoint you trust")
        return False
    raise BadInput(f"checkpoint {where!r} holds no weights; accepted: {SAFE_WEIGHTS}, or {SAFE_INDEX} with its "
                   f"shards (pickled pytorch_model.bin only with {PICKLE_FLAG})")
