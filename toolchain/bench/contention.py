"""Notice other processes running on our cores during a timed run.

llama.cpp's worker threads spin-wait for each other at every matmul; when another process takes
one of the cores, a 2-thread decode drops from ~140 to 1-10 tok/s. So each run measures how much
CPU time *other* processes used on the cores we are pinned to (busy jiffies of those cores in
/proc/stat minus this process's own utime+stime), and the caller re-runs a contended run.
Linux only; elsewhere nothing is measured and no run counts as contended.
"""

from __future__ import annotations

import os
import time

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_jiffies(cpus: set[int]) -> int:
    """Non-idle jiffies of `cpus`: user nice system irq softirq steal (guest time is inside user).

    Steal counts too: a hypervisor running someone else on our core hurts the same way.
    """
    total = 0
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                parts = line.split()
                if int(parts[0][3:]) in cpus:
                    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, parts[1:9])
                    total += user + nice + system + irq + softirq + steal
    return total


def _own_jiffies() -> int:
    """utime + stime of this process, all threads (fields 14 and 15 of /proc/self/stat)."""
    with open("/proc/self/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])


class ContentionMonitor:
    """`start()` before a run, `stop()` after: other processes' CPU seconds on our cores."""

    def __init__(self, cpus=None):
        self.cpus = set(cpus) if cpus else os.sched_getaffinity(0)
        self.enabled = os.path.exists("/proc/stat") and os.path.exists("/proc/self/stat")
        self._t0 = self._busy0 = self._own0 = 0

    def start(self) -> None:
        self._t0 = time.perf_counter()
        if self.enabled:
            self._busy0, self._own0 = _busy_jiffies(self.cpus), _own_jiffies()

    def stop(self) -> tuple[float, bool]:
        """(other processes' CPU seconds on our cores, contended?)."""
        wall = time.perf_counter() - self._t0
        if not self.enabled:
            return 0.0, False
        other = max(0, (_busy_jiffies(self.cpus) - self._busy0) - (_own_jiffies() - self._own0)) / _HZ
        # jiffies tick at 10 ms and the two counters are sampled apart, so allow 3 ticks of
        # noise; beyond that, more than 5% of our cores' time taken by others is contention
        return other, other > max(3 / _HZ, 0.05 * wall * len(self.cpus))
