"""Resolve a model name to (model, processor, adapter, defaults). The only place models are loaded."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ptqbench.errors import BadInput
from ptqbench.harness.adapters import Adapter, adapter_for

ACCEPTED = ("testbed, tiny:<family>, random:<config.json or dir>[@<image side>], a local checkpoint directory, "
            "or a hub id already in the local cache")


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


def load_model(name: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load on CPU; the engine moves one block at a time to the compute device."""
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

        spec = name.split(":", 1)[1]
        path, _, side = spec.partition("@")
        if side and not (side.isdigit() and int(side) >= 28):
            raise BadInput(f"image side {side!r} in {name!r} is not accepted; accepted: an integer >= 28 (pixels)")
        model, processor = build_random(path, dtype=dtype, image_side=int(side) if side else None)
        return LoadedModel(name, model, processor, adapter_for(model), 128, [], lazy=True)
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    if not os.path.isdir(name) and os.environ.get("HF_HUB_OFFLINE") is None:
        os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for the network: weights come from disk
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise BadInput(f"model {name!r} could not be found ({str(e).splitlines()[0][:160]}); accepted: {ACCEPTED}") from None
    from ptqbench.harness.adapters import supported_model_types

    if config.model_type not in supported_model_types():
        raise BadInput(f"model type {config.model_type!r} of {name!r} is not supported; accepted: {', '.join(supported_model_types())}")
    model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype).eval()
    processor = AutoProcessor.from_pretrained(name)
    return LoadedModel(name, model, processor, adapter_for(model), 128, [])
