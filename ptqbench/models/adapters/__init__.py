"""Adapter lookup and model loading (local path, hub id, or `tiny:<family>` random-weight models)."""

from __future__ import annotations

from torch import nn

from ptqbench.errors import BadInput
from ptqbench.models.adapters.base import Adapter, move
from ptqbench.models.adapters.families import ADAPTERS


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for(model: nn.Module) -> Adapter:
    mt = getattr(model.config, "model_type", None)
    for cls in ADAPTERS:
        if mt in cls.model_types:
            return cls(model)
    raise BadInput(f"model type {mt!r} is not supported; accepted: {', '.join(supported_model_types())}")


__all__ = ["Adapter", "adapter_for", "supported_model_types", "move", "ADAPTERS"]
