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
