"""RTN: round-to-nearest on the shared grid, no calibration data."""

from ptqbench.methods.base import BlockView, Method
from ptqbench.methods.quant import quantize_rtn


class RTN(Method):
    name = "rtn"
    summary = "Round-to-nearest, per row and group (no calibration statistics)"
    streams = "none"

    def quantize_block(self, block: BlockView) -> None:
        for name in block.linear_names:
            block.commit(name, quantize_rtn(block.weight(name), self.spec))
