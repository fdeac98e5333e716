"""Grade answers per capability bucket; accuracy (micro and macro) and retention against a reference model.

Macro accuracy is the mean over buckets, so a small bucket counts as much as a large one: "a 92%
average hides the cliff". Retention is a student's accuracy over the teacher's, per bucket and
macro; a bucket the teacher never gets right has no retention (None), not an infinite one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from toolchain.data.graders import GraderConfig, make_grader
from toolchain.data.tasks import TaskExample


@dataclass
class TaskScore:
    buckets: dict[str, dict] = field(default_factory=dict)  # bucket -> {n, correct, accuracy}
    micro: float = 0.0  # correct / all examples
    macro: float = 0.0  # mean of the buckets' accuracies
    empty: int = 0  # answers that were empty (the model stopped at once)

    def as_dict(self) -> dict:
        return {"buckets": self.buckets, "micro": self.micro, "macro": self.macro, "empty": self.empty}


def score(
    examples: list[TaskExample],
    answers: list[str],
    grader: GraderConfig,
    bucket_graders: dict[str, GraderConfig] | None = None,
) -> tuple[TaskScore, list[bool]]:
    """(scores, whether each answer was right); one grader per bucket, the task's by default."""
    if len(examples) != len(answers):
        raise ValueError(f"{len(answers)} answers for {len(examples)} examples")
    graders = {b: make_grader(g) for b, g in (bucket_graders or {}).items()}
    default = make_grader(grader)
    right = [graders.get(e.bucket, default)(e.answer, a) for e, a in zip(examples, answers)]
    out = TaskScore(empty=sum(not a.strip() for a in answers))
    for e, ok in zip(examples, right):
        b = out.buckets.setdefault(e.bucket, {"n": 0, "correct": 0})
        b["n"] += 1
        b["correct"] += int(ok)
    for b in out.buckets.values():
        b["accuracy"] = b["correct"] / b["n"]
    out.buckets = dict(sorted(out.buckets.items()))
    out.micro = sum(right) / len(right) if right else 0.0
    out.macro = sum(b["accuracy"] for b in out.buckets.values()) / len(out.buckets) if out.buckets else 0.0
    return out, right


def retention(student: dict, teacher: dict) -> dict:
    """{macro, min_bucket, buckets: {bucket: ratio or None}} of two `TaskScore.as_dict()`s."""

    def ratio(s: float, t: float) -> float | None:
        return s / t if t > 0 else None

    per = {
        b: ratio(student["buckets"].get(b, {}).get("accuracy", 0.0), v["accuracy"])
        for b, v in teacher["buckets"].items()
    }
    known = [r for r in per.values() if r is not None]
    return {
        "macro": ratio(student["macro"], teacher["macro"]),
        "min_bucket": min(known) if known else None,
        "buckets": per,
    }


def format_table(rows: dict[str, dict], title: str = "task accuracy") -> str:
    """A text table: one row per model, one column per bucket, then macro and micro."""
    if not rows:
        return f"{title}: nothing evaluated"
    buckets = sorted({b for r in rows.values() for b in r["buckets"]})
    width = max(12, *(len(n) for n in rows))
    head = f"{'model':<{width}}" + "".join(f" {b[:12]:>12}" for b in buckets) + f" {'macro':>7} {'micro':>7}"
    lines = [title, head, "-" * len(head)]
    for name, r in rows.items():
        cells = "".join(
            f" {r['buckets'][b]['accuracy']:>12.1%}" if b in r["buckets"] else f" {'-':>12}" for b in buckets
        )
        lines.append(f"{name:<{width}}{cells} {r['macro']:>7.1%} {r['micro']:>7.1%}")
    n = {b: next(r["buckets"][b]["n"] for r in rows.values() if b in r["buckets"]) for b in buckets}
    lines.append(f"{'(examples)':<{width}}" + "".join(f" {n[b]:>12}" for b in buckets))
    return "\n".join(lines)
