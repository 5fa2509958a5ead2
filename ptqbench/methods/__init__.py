"""PTQ methods behind one interface; the built-ins are listed in `registry.BUILTIN_METHODS`."""

from ptqbench.methods.base import Method, option
from ptqbench.methods.quant import QuantSpec, QuantizedWeight
from ptqbench.methods.registry import all_methods, get_method, register

__all__ = ["Method", "option", "QuantSpec", "QuantizedWeight", "all_methods", "get_method", "register"]
