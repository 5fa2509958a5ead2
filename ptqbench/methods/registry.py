"""Method registry: the built-ins are the table below; `register()` adds a method at runtime; plugins
arrive through the entry-point group `ptqbench.methods` (each entry point names a `Method` subclass)
without touching the core."""

from __future__ import annotations

from importlib.metadata import entry_points

from ptqbench.errors import BadInput
from ptqbench.methods.awq import AWQ
from ptqbench.methods.base import Method
from ptqbench.methods.gptaq import GPTAQ
from ptqbench.methods.gptq import GPTQ
from ptqbench.methods.mbq import MBQ
from ptqbench.methods.rtn import RTN
from ptqbench.methods.smoothquant import SmoothQuant
from ptqbench.methods.vlmq import VLMQ

ENTRY_POINT_GROUP = "ptqbench.methods"
BUILTIN_METHODS: dict[str, type[Method]] = {
    "rtn": RTN,
    "gptq": GPTQ,
    "gptaq": GPTAQ,
    "awq": AWQ,
    "mbq": MBQ,
    "vlmq": VLMQ,
    "smoothquant": SmoothQuant,
}
_REGISTERED: dict[str, type[Method]] = dict(BUILTIN_METHODS)  # the table plus runtime registrations
_PLUGINS: dict[str, type[Method]] | None = None
_PLUGIN_ERRORS: dict[str, str] = {}


def register(cls: type[Method]) -> type[Method]:
    """Register a method class under its `name` at runtime (listed with the built-ins)."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    _REGISTERED[cls.name] = cls
    return cls


def _plugins() -> dict[str, type[Method]]:
    global _PLUGINS
    if _PLUGINS is None:
        _PLUGINS = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                cls = ep.load()
                if not (isinstance(cls, type) and issubclass(cls, Method)):
                    raise TypeError(f"{ep.value} is not a ptqbench Method subclass")
                _PLUGINS[cls.name or ep.name] = cls
            except Exception as e:  # a broken plugin is reported, never silently dropped
                _PLUGIN_ERRORS[ep.name] = f"{type(e).__name__}: {e}"
    return _PLUGINS


def all_methods() -> dict[str, tuple[type[Method], str]]:
    """name -> (class, origin) where origin is 'builtin' or 'plugin'."""
    out = {n: (c, "builtin") for n, c in _REGISTERED.items()}
    out.update({n: (c, "plugin") for n, c in _plugins().items() if n not in out})
    return out


def plugin_errors() -> dict[str, str]:
    _plugins()
    return dict(_PLUGIN_ERRORS)


def get_method(name: str) -> type[Method]:
    methods = all_methods()
    if name not in methods:
        broken = f" (plugin {name!r} failed to load: {_PLUGIN_ERRORS[name]})" if name in _PLUGIN_ERRORS else ""
        raise BadInput(f"method {name!r} is not known{broken}; accepted: {', '.join(sorted(methods))}")
    return methods[name][0]
