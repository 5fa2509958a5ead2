"""PTQ methods behind one interface. Importing this package registers the built-ins."""

from ptqbench.methods import rtn, gptq, gptaq, awq, mbq, vlmq  # noqa: F401,E402  (registration side effects)
from ptqbench.methods.base import Method, option
from ptqbench.methods.quant import QuantSpec, QuantizedWeight
from ptqbench.methods.registry import all_methods, get_method, register

__all__ = ["Method", "option", "QuantSpec", "QuantizedWeight", "all_methods", "get_method", "register"]
