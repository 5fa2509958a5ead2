"""Where a run spends its time: wall seconds per phase (model load, calibration, quantization, evaluation,
latency, saving), the rest counted as other. A phase inside another is taken out of the outer one, so the
shares add up to the whole run. `bench run --profile` prints it; every run folder keeps it (profile.json)."""

from __future__ import annotations

import time
from contextlib import contextmanager

PHASES = ("model load", "calibration", "quantization", "saving", "evaluation", "latency")


class Profile:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self._stack: list[list] = []  # [phase, start, seconds of inner phases]

    @contextmanager
    def phase(self, name: str):
        self._stack.append([name, time.perf_counter(), 0.0])
        try:
            yield
        finally:
            _, start, inner = self._stack.pop()
            spent = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + spent - inner
            self.counts[name] = self.counts.get(name, 0) + 1
            if self._stack:
                self._stack[-1][2] += spent

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.counts[name] = self.counts.get(name, 0) + 1

    def summary(self) -> dict:
        total = time.perf_counter() - self.t0
        known = sum(self.seconds.values())
        order = [p for p in PHASES if p in self.seconds] + sorted(set(self.seconds) - set(PHASES))
        rows = {p: dict(seconds=round(self.seconds[p], 2), count=self.counts[p]) for p in order}
        rows["other"] = dict(seconds=round(max(0.0, total - known), 2), count=1)
        return dict(total_seconds=round(total, 2), phases=rows)

    def lines(self) -> list[str]:
        s = self.summary()
        total = s["total_seconds"] or 1.0
        out = [f"[profile] {'phase':<13} {'seconds':>8} {'share':>6}  calls"]
        for p, r in s["phases"].items():
            out.append(f"[profile] {p:<13} {r['seconds']:>8.1f} {r['seconds'] / total:>6.0%}  {r['count']}")
        out.append(f"[profile] {'total':<13} {s['total_seconds']:>8.1f}")
        return out
