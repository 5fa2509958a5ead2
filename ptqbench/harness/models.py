"""Resolve a model name to (model, processor, adapter, defaults). The only place models are loaded.

Inputs cannot run code: a checkpoint directory (or a hub id resolved to its snapshot folder in the local
cache) is checked by `check_model_source` before anything is loaded: its `SHA256SUMS`, when present, must
match every file; its weights must be safetensors (pickled `.bin`/`.pt`/`.pth` weights only with
`allow_pickle`); its JSON files and safetensors headers must parse. Every `from_pretrained` call passes
`trust_remote_code=False` and `local_files_only=True`, and `use_safetensors=True` whenever safetensors
weights are present, so transformers never falls back to a pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ptqbench.errors import BadInput
from ptqbench.harness.adapters import Adapter, adapter_for

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
_INTACT = "an intact checkpoint (download or save it again)"


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    processor: object
    adapter: Adapter
    group_size: int  # the model's natural group size for `bench run` defaults
    tasks: list[str] = field(default_factory=list)  # default tasks
    lazy: bool = False  # decoder blocks on meta, materialized one at a time (random-weight cost runs)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":  # fp32 on CPU keeps the small models exact; bf16 on GPUs
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BadInput("device 'cuda' is not available on this machine; accepted: auto, cpu")
    return torch.device(name)


def _first_line(e: BaseException) -> str:
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

def _json_file(p: Path, what: str = "checkpoint file"):
    try:
        with open(p, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise BadInput(f"{what} {str(p)!r} is not valid JSON ({_first_line(e)}); accepted: {_INTACT}") from None


def _check_safetensors_header(p: Path) -> None:
    """The 8-byte header length, the JSON header and the tensors' extent, read without loading a tensor."""
    def bad(why: str) -> BadInput:
        return BadInput(f"checkpoint file {str(p)!r} is not a valid safetensors file ({why}); accepted: {_INTACT}")

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
        raise BadInput(f"checkpoint file {str(p)!r} cannot be read ({_first_line(e)}); accepted: {_INTACT}") from None
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


def _weight_files(d: Path) -> tuple[list[Path], list[Path]]:
    """(the safetensors files transformers loads, in its order of preference; the pickled weight files)."""
    pickled = sorted(p for p in d.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))
    if (d / SAFE_WEIGHTS).is_file():
        return [d / SAFE_WEIGHTS], pickled
    index = d / SAFE_INDEX
    if not index.is_file():
        return [], pickled
    wm = _json_file(index)
    wm = wm.get("weight_map") if isinstance(wm, dict) else None
    if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
        raise BadInput(f"checkpoint file {str(index)!r} has no weight_map of tensor names to files; accepted: {_INTACT}")
    safe = []
    for fname in sorted(set(wm.values())):
        rel = Path(fname)
        if rel.is_absolute() or ".." in rel.parts or not fname.endswith(".safetensors"):
            raise BadInput(f"checkpoint file {str(index)!r} names {fname[:120]!r}; accepted: .safetensors files inside {str(d)!r}")
        if not (d / rel).is_file():
            raise BadInput(f"checkpoint file {str(d / rel)!r} listed in {SAFE_INDEX} is missing; accepted: {_INTACT}")
        safe.append(d / rel)
    return safe, pickled


def _checkpoint_dir(name: str) -> Path:
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


def _check_checkpoint(name: str, d: Path, allow_pickle: bool) -> bool:
    """Pre-flight checks of a checkpoint directory; True when its weights are safetensors."""
    from ptqbench.harness.adapters import supported_model_types

    where = name if os.path.realpath(name) == os.path.realpath(d) else f"{name} ({d})"
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise BadInput(f"checkpoint {where!r} has no config.json; accepted: {ACCEPTED}")
    verify_checkpoint_sums(d)
    for p in sorted(d.glob("*.json")):  # config, index, tokenizer, processor: each parses before a loader reads it
        if p.is_file() and p.stat().st_size <= _MAX_JSON:
            _json_file(p)
    config = _json_file(cfg_path)
    if not isinstance(config, dict):
        raise BadInput(f"checkpoint file {str(cfg_path)!r} is not a JSON object; accepted: {_INTACT}")
    model_type = config.get("model_type")
    if model_type is not None and model_type not in supported_model_types():
        raise BadInput(f"model type {model_type!r} of {name!r} is not supported; accepted: {', '.join(supported_model_types())}")
    safe, pickled = _weight_files(d)
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


def _random_spec(name: str) -> tuple[str, int | None]:
    spec = name.split(":", 1)[1]
    path, _, side = spec.partition("@")
    if side and not (side.isdigit() and int(side) >= 28):
        raise BadInput(f"image side {side!r} in {name!r} is not accepted; accepted: an integer >= 28 (pixels)")
    return path, int(side) if side else None


def _check_random(name: str) -> tuple[str, int | None]:
    from ptqbench.harness.lazy import FAMILY_OF

    path, side = _random_spec(name)
    if os.path.isdir(path):
        cfg_path = Path(path) / "config.json"
        if not cfg_path.is_file():
            raise BadInput(f"random model config directory {path!r} has no config.json; accepted: a config.json file "
                           "or a directory holding one")
    elif os.path.isfile(path):
        cfg_path = Path(path)
    else:
        raise BadInput(f"random model config {path!r} does not exist; accepted: a config.json file or a directory holding one")
    config = _json_file(cfg_path, "random model config")
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type is None:
        raise BadInput(f"config {str(cfg_path)!r} has no model_type; accepted: a transformers config.json")
    if model_type not in FAMILY_OF:
        raise BadInput(f"model type {model_type!r} of {path!r} has no random builder; accepted: {', '.join(FAMILY_OF)}")
    if side is not None and not model_type.startswith("qwen"):
        raise BadInput(f"an image side (@{side}) is only understood for Qwen-family processors; accepted: "
                       + ", ".join(k for k in FAMILY_OF if k.startswith("qwen")) + " configs, or no @side")
    return path, side


def _check_source(name: str, allow_pickle: bool):
    """The checks of `check_model_source`; for a checkpoint, (its directory, whether its weights are safetensors)."""
    if not isinstance(name, str) or not name:
        raise BadInput(f"model {name!r} is not accepted; accepted: {ACCEPTED}")
    if name == "testbed":
        from ptqbench.benchmarks.testbed import TESTBED_DIR, verify_sha256sums

        if not TESTBED_DIR.is_dir():
            raise BadInput(f"testbed directory {str(TESTBED_DIR)!r} is missing; accepted: a directory written by "
                           "scripts/train_testbed.py")
        verify_sha256sums(TESTBED_DIR)
        return None
    if name.startswith("tiny:"):
        from ptqbench.harness.tiny import TINY_FAMILIES

        family = name.split(":", 1)[1]
        if family not in TINY_FAMILIES:
            raise BadInput(f"tiny family {family!r} is not known; accepted: {', '.join(TINY_FAMILIES)}")
        return None
    if name.startswith("random:"):
        _check_random(name)
        return None
    d = _checkpoint_dir(name)
    return d, _check_checkpoint(name, d, allow_pickle)


def check_model_source(name: str, allow_pickle: bool = False) -> None:
    """Cheap pre-flight check of a model name, before any work; loads no weights. BadInput (one line) unless:
    `testbed` is present and matches its SHA256SUMS; `tiny:<family>` names a known family;
    `random:<config>[@side]` names a readable config of a family with a random builder (and a valid side);
    a local checkpoint directory, or a hub id resolved to its snapshot folder in the local cache, has a
    config.json of a supported model type, parseable JSON files, SHA256SUMS matching every file when it has
    one, and safetensors weights whose headers are intact (pickled weights only with `allow_pickle`)."""
    _check_source(name, allow_pickle)


def _load_errors() -> tuple[type[BaseException], ...]:
    """What transformers raises for a file it cannot read: missing or unreadable files (OSError), JSON and
    value errors (ValueError), missing keys, safetensors' own errors and config fields of the wrong type."""
    errors: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError)
    try:
        from safetensors import SafetensorError

        errors += (SafetensorError,)
    except ImportError:  # pragma: no cover - transformers depends on safetensors
        pass
    try:  # a config field of the wrong type (transformers' configs are strict dataclasses)
        from huggingface_hub.errors import StrictDataclassError

        errors += (StrictDataclassError,)
    except ImportError:  # pragma: no cover - older huggingface_hub
        pass
    return errors


def _load_checkpoint(name: str, d: Path, safetensors: bool, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from ptqbench.harness.adapters import supported_model_types

    errors = _load_errors()
    opts = {"trust_remote_code": False, "local_files_only": True}
    try:
        config = AutoConfig.from_pretrained(str(d), **opts)
    except errors as e:
        raise BadInput(f"checkpoint file {str(d / 'config.json')!r} of model {name!r} could not be read "
                       f"({_first_line(e)}); accepted: {_INTACT}") from None
    if config.model_type not in supported_model_types():
        raise BadInput(f"model type {config.model_type!r} of {name!r} is not supported; accepted: {', '.join(supported_model_types())}")
    if safetensors:
        files = ", ".join(str(p) for p in _weight_files(d)[0][:3])
    else:
        files = ", ".join(str(p) for p in _weight_files(d)[1][:3])
    try:
        model = AutoModelForImageTextToText.from_pretrained(str(d), config=config, dtype=dtype,
                                                            use_safetensors=safetensors, **opts)
    except errors as e:
        raise BadInput(f"checkpoint weights {files!r} of model {name!r} could not be loaded ({_first_line(e)}); "
                       f"accepted: {_INTACT}") from None
    try:
        processor = AutoProcessor.from_pretrained(str(d), **opts)
    except errors as e:
        raise BadInput(f"the processor files (tokenizer, image processor) in {str(d)!r} of model {name!r} could not be "
                       f"loaded ({_first_line(e)}); accepted: {_INTACT}") from None
    return model.eval(), processor


def load_model(name: str, dtype: torch.dtype = torch.float32, allow_pickle: bool = False) -> LoadedModel:
    """Load on CPU; the engine moves one block at a time to the compute device. `check_model_source` runs
    first (a checkpoint's SHA256SUMS is hashed once per process while its files are unchanged); pickled
    weights are loaded only with `allow_pickle`."""
    source = _check_source(name, allow_pickle)
    if name == "testbed":
        from ptqbench.benchmarks.testbed import load_testbed

        model, processor = load_testbed(dtype=dtype)
        return LoadedModel(name, model, processor, adapter_for(model), 64, ["synthvqa", "synthvqa-nll"])
    if name.startswith("tiny:"):
        from ptqbench.harness.tiny import build_tiny

        model, processor = build_tiny(name.split(":", 1)[1])
        model = model.to(dtype)
        return LoadedModel(name, model, processor, adapter_for(model), 32, [])
    if name.startswith("random:"):  # a real architecture from its config, random weights, lazy blocks
        from ptqbench.harness.lazy import build_random

        path, side = _random_spec(name)
        model, processor = build_random(path, dtype=dtype, image_side=side)
        return LoadedModel(name, model, processor, adapter_for(model), 128, [], lazy=True)
    d, safetensors = source
    if not os.path.isdir(name) and os.environ.get("HF_HUB_OFFLINE") is None:
        os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for the network: weights come from disk
    model, processor = _load_checkpoint(name, d, safetensors, dtype)
    return LoadedModel(name, model, processor, adapter_for(model), 128, [])
