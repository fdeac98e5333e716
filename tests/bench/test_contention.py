"""Contention: other processes on our cores are noticed, and contended runs are re-run."""

import os
import subprocess
import sys
import time

from toolchain.bench.contention import ContentionMonitor
from toolchain.bench.stats import measure


def test_monitor_sees_a_busy_process_on_our_core():
    cpu = min(os.sched_getaffinity(0))
    hog = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"])
    try:
        time.sleep(0.3)  # let it start spinning
        mon = ContentionMonitor([cpu])
        mon.start()
        time.sleep(0.5)  # we sleep: the core is all the hog's
        other_s, contended = mon.stop()
    finally:
        hog.kill()
        hog.wait()
    assert contended and other_s > 0.3


class FakeSession:
    info: dict = {}  # noqa: RUF012  (a stand-in object's attribute, never shared)

    def reset(self):
        pass

    def feed(self, ids):
        time.sleep(0.0005 * len(ids))

    def argmax(self):
        return 0

    def close(self):
        pass


class ScriptedMonitor:
    """Says 'contended' for the first `n` runs (warm-up is not monitored)."""

    def __init__(self, n):
        self.n = n

    def start(self):
        pass

    def stop(self):
        self.n -= 1
        return (1.0, True) if self.n >= 0 else (0.0, False)


def test_contended_runs_are_rerun_and_counted():
    ids = list(range(8))
    r = measure(FakeSession(), ids, ids[:2], 3, runs=2, monitor=ScriptedMonitor(1))
    assert r["contended_runs"] == 1 and r["contended_kept"] == 0 and len(r["decode_tps"]["runs"]) == 2
    # always contended: each run is tried 1 + 2 times, the last attempt is kept and flagged
    r = measure(FakeSession(), ids, ids[:2], 3, runs=2, monitor=ScriptedMonitor(99))
    assert r["contended_runs"] == 6 and r["contended_kept"] == 2 and len(r["decode_tps"]["runs"]) == 2
