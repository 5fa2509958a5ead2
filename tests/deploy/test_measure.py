import torch

from ptqbench.deploy.measure import measure, rss_bytes


def test_cpu_peak_rss_sees_a_transient_allocation():
    before = rss_bytes()
    with measure("cpu", interval=0.005) as m:
        x = torch.ones(64 * 1024 * 1024 // 4 * 3)  # 192 MB, touched
        x.add_(1)
        del x
    assert m.kind == "cpu-peak-rss" and m.seconds > 0
    assert m.peak_bytes >= before + 150 * 1024 * 1024


def test_released_memory_goes_back_to_the_system():
    import ctypes

    import pytest

    from ptqbench.deploy.measure import release_free_memory, rss_bytes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        pytest.skip("no glibc malloc_trim here: release_free_memory only collects garbage")
    release_free_memory()
    base = rss_bytes()
    xs = [torch.ones(256, 1024) for _ in range(200)]  # 200 MiB in 1 MiB pieces, touched
    grown = rss_bytes() - base
    keep = xs[-1]
    del xs
    release_free_memory()
    assert grown > 150 * 2**20
    assert rss_bytes() - base < grown / 2  # what was freed is no longer counted as resident
    del keep
