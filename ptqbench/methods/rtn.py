"""RTN: round-to-nearest on the shared grid, no calibration data."""

from ptqbench.methods.base import Method
from ptqbench.methods.quant import quantize_rtn
from ptqbench.methods.registry import register


@register
class RTN(Method):
    name = "rtn"
    summary = "Round-to-nearest, per row and group (no calibration statistics)"
    streams = "none"

    def quantize_block(self, block) -> None:
        for name in block.linear_names:
            block.commit(name, quantize_rtn(block.weight(name), self.spec))
