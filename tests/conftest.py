"""Shared fixtures: a tiny random-weight Qwen2-VL and a calibration set captured from it."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from ptqbench.engine import calibration as C
from ptqbench.models.adapters import adapter_for


from _helpers import tiny_samples, write_sharegpt  # noqa: E402


@pytest.fixture(scope="session")
def tiny_qwen():
    from ptqbench.models.tiny import build_tiny

    torch.manual_seed(0)
    model, processor = build_tiny("qwen2-vl")
    return model, processor


@pytest.fixture(scope="session")
def tiny_calib(tiny_qwen, tmp_path_factory):
    model, processor = tiny_qwen
    d = tmp_path_factory.mktemp("calib")
    path = write_sharegpt(d, tiny_samples(processor, n=8))
    return C.build_calibration(model, adapter_for(model), processor, str(path), 8, 512, 1, batch_size=4)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny
    matrices gain nothing from threads, and on a shared, loaded 2-core CPU they lose a lot to contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
