"""Plots for report.html (matplotlib, Agg backend, PNG bytes).

Three questions a user asks of a run: which export gives the best size/speed/quality trade-off
(the Pareto front), how fast is it on each target, and how close is each figure to what the
memory bandwidth allows (the roofline).
"""

from __future__ import annotations

import io


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers / CI
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def _ok(rows: list[dict]) -> list[dict]:
    return [b for b in rows if not b.get("skipped") and b.get("fits", True) and b.get("decode_tps")]


def pareto_front(points: list[tuple[float, float, float]]) -> list[int]:
    """Indices of points not dominated when minimising size and maximising speed and quality."""
    front = []
    for i, (s, v, q) in enumerate(points):
        dominated = any(
            s2 <= s and v2 >= v and q2 >= q and (s2, v2, q2) != (s, v, q)
            for j, (s2, v2, q2) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


def quality_of(report: dict) -> dict:
    """(format, quant) -> greedy agreement with the torch model, from verify."""
    out = {("hf", "fp32"): 1.0}  # the torch fp32 student is the reference the others are checked against
    for e in report.get("exports", []):
        p = e.get("parity") or {}
        if p.get("greedy_agreement") is not None:
            out[(e["format"], e["quant"])] = p["greedy_agreement"]
    return out


def size_speed_quality(report: dict, target: str | None = None) -> bytes | None:
    rows = [b for b in _ok(report.get("bench", [])) if b.get("bytes") and (target is None or b["target"] == target)]
    if not rows:
        return None
    quality = quality_of(report)
    pts = [(b["bytes"] / 1e6, b["decode_tps"]["median"], quality.get((b.get("format"), b["quant"]), 0.0)) for b in rows]
    front = set(pareto_front(pts))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sc = ax.scatter(
        [p[0] for p in pts],
        [p[1] for p in pts],
        c=[p[2] for p in pts],
        cmap="viridis",
        vmin=0,
        vmax=1,
        s=80,
        edgecolors="black",
        zorder=3,
    )
    for i, (b, p) in enumerate(zip(rows, pts)):
        ax.annotate(f"{b['runtime']} {b['quant']}", (p[0], p[1]), textcoords="offset points", xytext=(6, 4), fontsize=8)
        if i in front:
            ax.scatter([p[0]], [p[1]], s=260, facecolors="none", edgecolors="crimson", linewidths=1.8, zorder=4)
    fr = sorted((pts[i] for i in front), key=lambda p: p[0])
    ax.plot([p[0] for p in fr], [p[1] for p in fr], color="crimson", lw=1, ls="--", label="Pareto front", zorder=2)
    fig.colorbar(sc, ax=ax, label="quality: greedy agreement with torch")
    ax.margins(x=0.15, y=0.1)  # room for the labels
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("decode tokens/s (median)")
    ax.set_title(f"Size vs speed vs quality{f' on {target}' if target else ''}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return _png(fig)


def per_target(report: dict) -> bytes | None:
    rows = _ok(report.get("bench", []))
    targets = sorted({b["target"] for b in rows})
    models = sorted({(b["runtime"], b["quant"]) for b in rows})
    if not rows or len(targets) < 1:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(targets) * max(1, len(models)) / 2), 4.5))
    width = 0.8 / max(1, len(models))
    for k, (rt, q) in enumerate(models):
        xs, measured, projected = [], [], []
        for t_i, t in enumerate(targets):
            b = next((b for b in rows if b["target"] == t and b["runtime"] == rt and b["quant"] == q), None)
            if b is None:
                continue
            xs.append(t_i + k * width)
            measured.append(b["decode_tps"]["median"])
            projected.append((b.get("projection") or {}).get("decode_tps"))
        bars = ax.bar(xs, measured, width, label=f"{rt} {q}")
        for x, p in zip(xs, projected):
            if p:
                ax.bar([x], [p], width, fill=False, hatch="//", edgecolor=bars.patches[0].get_facecolor())
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(targets))], targets)
    ax.set_ylabel("decode tokens/s")
    ax.set_title("Decode speed per target (solid: measured here; hatched: projected to the device)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def roofline(report: dict) -> bytes | None:
    # a target emulated by another target's run shares its measurement: plot each run once
    rows = [
        b
        for b in _ok(report.get("bench", []))
        if (b.get("roofline") or {}).get("ceiling_tps") and b.get("measured_for", b["target"]) == b["target"]
    ]
    if not rows:
        return None
    plt = _plt()
    labels = [f"{b['runtime']} {b['quant']}\n{b['target']}" for b in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4.5))
    xs = range(len(rows))
    ax.bar(
        [x - 0.2 for x in xs],
        [b["roofline"]["ceiling_tps"] for b in rows],
        0.4,
        color="lightgray",
        label="ceiling: bandwidth / bytes per token",
    )
    ax.bar([x + 0.2 for x in xs], [b["decode_tps"]["median"] for b in rows], 0.4, color="tab:blue", label="measured")
    for x, b in zip(xs, rows):
        eff = b["roofline"].get("efficiency")
        if eff is not None:
            ax.annotate(f"{eff:.0%}", (x + 0.2, b["decode_tps"]["median"]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("decode tokens/s")
    ax.set_title("Decode against the memory-bandwidth roofline")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def task_buckets(report: dict) -> bytes | None:
    """Accuracy per capability bucket, one bar per model: where a student falls off a cliff."""
    models = ((report.get("task") or {}).get("models")) or {}
    if not models:
        return None
    plt = _plt()
    buckets = sorted({b for m in models.values() for b in m["score"]["buckets"]})
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(buckets) + 2), 3.6))
    width = 0.8 / len(models)
    for i, (name, m) in enumerate(models.items()):
        acc = [100 * m["score"]["buckets"].get(b, {}).get("accuracy", 0.0) for b in buckets]
        ax.bar([j + i * width for j in range(len(buckets))], acc, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(buckets))], buckets, rotation=20, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title("task accuracy per bucket (eval split)")
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)
