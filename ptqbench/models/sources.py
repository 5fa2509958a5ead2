"""Resolve a model name to (model, processor, adapter, defaults). The only place models are loaded.

Inputs cannot run code: a checkpoint directory (or a hub id resolved to its snapshot folder in the local
cache) is checked by `check_model_source` before anything is loaded (checkpoints.py: SHA256SUMS, no
pickled weights without `allow_pickle`, parseable files). Every `from_pretrained` call passes
`trust_remote_code=False` and `local_files_only=True`, and `use_safetensors=True` whenever safetensors
weights are present, so transformers never falls back to a pickle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ptqbench.errors import BadInput
from ptqbench.models.adapters import Adapter, adapter_for
from ptqbench.models.checkpoints import ACCEPTED, INTACT, check_checkpoint, checkpoint_dir, first_line, json_file, weight_files

@dataclass(frozen=True)
class Source:
    """A kind of model name: how it is written, its natural group size, its default tasks."""

    syntax: str
    group_size: int  # `bench run`'s default --group-size for it
    tasks: tuple[str, ...]  # default tasks (only the testbed has weights a task can score meaningfully)
    lazy: bool  # decoder blocks on meta, materialized one at a time
    what: str


SOURCES = {
    "testbed": Source("testbed", 64, ("synthvqa", "synthvqa-nll"), False,
                      "the trained testbed VLM shipped in models/testbed_model (the default)"),
    "tiny": Source("tiny:<family>", 32, (), False, "a tiny random-weight model of a family (tests, smoke runs)"),
    "random": Source("random:<config.json>[@side]", 128, (), True,
                     "a real architecture from its config.json, random weights, built block by block (cost runs)"),
    "checkpoint": Source("<dir> | <hub id>", 128, (), False,
                         "a local checkpoint directory, or a hub id already in the local cache"),
}


def source_kind(name: str) -> str:
    if name == "testbed":
        return "testbed"
    return name.split(":", 1)[0] if name.startswith(("tiny:", "random:")) else "checkpoint"


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


def _random_spec(name: str) -> tuple[str, int | None]:
    spec = name.split(":", 1)[1]
    path, _, side = spec.partition("@")
    if side and not (side.isdigit() and int(side) >= 28):
        raise BadInput(f"image side {side!r} in {name!r} is not accepted; accepted: an integer >= 28 (pixels)")
    return path, int(side) if side else None


def _check_random(name: str) -> tuple[str, int | None]:
    from ptqbench.models.lazy import FAMILY_OF

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
    config = json_file(cfg_path, "random model config")
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
        from ptqbench.models.testbed import TESTBED_DIR, verify_sha256sums

        if not TESTBED_DIR.is_dir():
            raise BadInput(f"testbed directory {str(TESTBED_DIR)!r} is missing; accepted: a directory written by "
                           "testbed/train.py")
        verify_sha256sums(TESTBED_DIR)
        return None
    if name.startswith("tiny:"):
        from ptqbench.models.tiny import TINY_FAMILIES

        family = name.split(":", 1)[1]
        if family not in TINY_FAMILIES:
            raise BadInput(f"tiny family {family!r} is not known; accepted: {', '.join(TINY_FAMILIES)}")
        return None
    if name.startswith("random:"):
        _check_random(name)
        return None
    d = checkpoint_dir(name)
    return d, check_checkpoint(name, d, allow_pickle)


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

    from ptqbench.models.adapters import supported_model_types

    errors = _load_errors()
    opts = {"trust_remote_code": False, "local_files_only": True}
    try:
        config = AutoConfig.from_pretrained(str(d), **opts)
    except errors as e:
        raise BadInput(f"checkpoint file {str(d / 'config.json')!r} of model {name!r} could not be read "
                       f"({first_line(e)}); accepted: {INTACT}") from None
    if config.model_type not in supported_model_types():
        raise BadInput(f"model type {config.model_type!r} of {name!r} is not supported; accepted: {', '.join(supported_model_types())}")
    if safetensors:
        files = ", ".join(str(p) for p in weight_files(d)[0][:3])
    else:
        files = ", ".join(str(p) for p in weight_files(d)[1][:3])
    try:
        model = AutoModelForImageTextToText.from_pretrained(str(d), config=config, dtype=dtype,
                                                            use_safetensors=safetensors, **opts)
    except errors as e:
        raise BadInput(f"checkpoint weights {files!r} of model {name!r} could not be loaded ({first_line(e)}); "
                       f"accepted: {INTACT}") from None
    try:
        processor = AutoProcessor.from_pretrained(str(d), **opts)
    except errors as e:
        raise BadInput(f"the processor files (tokenizer, image processor) in {str(d)!r} of model {name!r} could not be "
                       f"loaded ({first_line(e)}); accepted: {INTACT}") from None
    return model.eval(), processor


def load_model(name: str, dtype: torch.dtype = torch.float32, allow_pickle: bool = False) -> LoadedModel:
    """Load on CPU; the engine moves one block at a time to the compute device. `check_model_source` runs
    first (a checkpoint's SHA256SUMS is hashed once per process while its files are unchanged); pickled
    weights are loaded only with `allow_pickle`."""
    checked = _check_source(name, allow_pickle)
    kind = source_kind(name)
    if kind == "testbed":
        from ptqbench.models.testbed import load_testbed

        model, processor = load_testbed(dtype=dtype)
    elif kind == "tiny":
        from ptqbench.models.tiny import build_tiny

        model, processor = build_tiny(name.split(":", 1)[1])
        model = model.to(dtype)
    elif kind == "random":
        from ptqbench.models.lazy import build_random

        path, side = _random_spec(name)
        model, processor = build_random(path, dtype=dtype, image_side=side)
    else:
        d, safetensors = checked
        if not os.path.isdir(name) and os.environ.get("HF_HUB_OFFLINE") is None:
            os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for the network: weights come from disk
        model, processor = _load_checkpoint(name, d, safetensors, dtype)
    s = SOURCES[kind]
    return LoadedModel(name, model, processor, adapter_for(model), s.group_size, list(s.tasks), lazy=s.lazy)
