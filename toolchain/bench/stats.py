"""Small statistics shared by the runners (no numpy needed by callers)."""

from __future__ import annotations

import statistics


def summary(values: list[float]) -> dict:
    """Median, p95 and spread of per-run values."""
    s = sorted(values)
    p95 = s[min(len(s) - 1, round(0.95 * (len(s) - 1)))]
    return {
        "median": statistics.median(s),
        "p95": p95,
        "stddev": statistics.stdev(s) if len(s) > 1 else 0.0,
        "runs": list(values),
    }
