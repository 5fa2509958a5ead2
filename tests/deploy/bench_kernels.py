"""pytest-benchmark of each deployment kernel on a 1024x1024 layer at batch 1.

Run the timings with `pytest tests/deploy/bench_kernels.py --benchmark-enable` (the repo's pytest
config passes --benchmark-disable, so by default each benchmark runs once as a plain test). On a
shared CPU, pin threads (e.g. OMP_NUM_THREADS=1) and compare medians, not means.
"""

import pytest
import torch

from ptqbench.deploy.kernels import QuantLinear
from ptqbench.methods.quant import QuantSpec, quantize_rtn

SHAPE = 1024  # out = in features
CASES = [  # kernel, bits, group size, dtype
    ("fake", 16, 0, torch.float32),
    ("fake", 16, 0, torch.bfloat16),
    ("int4pack", 4, 128, torch.bfloat16),
    ("int4pack", 4, 128, torch.float32),
    ("int8pack", 8, -1, torch.bfloat16),
    ("int8pack", 8, -1, torch.float32),
    ("dequant", 2, 128, torch.float32),
    ("dequant", 3, 128, torch.float32),
    ("dequant", 4, 128, torch.float32),
    ("dequant", 4, 128, torch.bfloat16),
    ("dequant", 8, -1, torch.float32),
]


@pytest.fixture(scope="module")
def weight():
    return torch.randn(SHAPE, SHAPE, generator=torch.Generator().manual_seed(0)) * 0.02


def _id(case):
    kernel, bits, group, dtype = case
    return f"{kernel}-w{bits}{'' if group == 0 else ('ch' if group == -1 else f'g{group}')}-{str(dtype).split('.')[-1]}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_kernel_1024_batch1(benchmark, weight, case):
    kernel, bits, group, dtype = case
    qw = quantize_rtn(weight, QuantSpec(bits=min(bits, 8), group_size=group if group else 128))
    layer = QuantLinear(qw, None, kernel, dtype)
    x = torch.randn(1, SHAPE, generator=torch.Generator().manual_seed(1)).to(dtype)
    benchmark.extra_info.update(kernel=kernel, bits=bits, dtype=str(dtype), threads=torch.get_num_threads())
    with torch.inference_mode():
        y = benchmark(layer, x)
    assert y.shape == (1, SHAPE) and torch.isfinite(y).all()
