"""Calibrate a shipped student's confidence and choose when it hands a request to its teacher.

On the task's calibration split (held out from training, like eval): the student's GGUF answers
in llama.cpp with per-token confidence stats, graded by the task's grader; a temperature fitted
by the binary log-loss of "answer right" (temperature scaling); reliability and ECE per bucket;
the coverage-vs-accuracy curve; and the threshold: the lowest confidence at which the student
still answers while the student+fallback accuracy stays within `max_drop` of the teacher's on
the same examples (the teacher answers everything below the threshold).
"""

from __future__ import annotations

import os

import numpy as np

from toolchain.data.tasks import TaskExample
from toolchain.formats import Artifact
from toolchain.runtime.confidence import NEVER, T_GRID, answer_confidence


def graded_with_stats(
    gguf: Artifact, examples: list[TaskExample], task, tokenizer_dir: str | os.PathLike, threads: int = 0
) -> dict:
    """The GGUF's greedy answers with per-token stats, and whether each is right."""
    from transformers import AutoTokenizer

    from toolchain.data.chat_encoding import prompt_token_ids, stop_token_ids
    from toolchain.eval import generate as G
    from toolchain.eval.score import score

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    stops = stop_token_ids(tok, tokenizer_dir)
    prompts = [prompt_token_ids(tok, e.prompt) for e in examples]
    stats: list = []
    raw = G.llama_generate(gguf["path"], prompts, task.max_new_tokens, stops, threads, stats=stats)
    answers = [G.decode_answer(tok, ids, stops) for ids in raw]
    _, right = score(examples, answers, task.grader, task.bucket_graders)
    return {"answers": answers, "right": right, "tokens": raw, "stats": stats, "stops": stops}


def confidences(g: dict, temperature: float) -> np.ndarray:
    return np.array([answer_confidence(s, g["stops"], t, temperature) for s, t in zip(g["stats"], g["tokens"])])


def ece(conf: np.ndarray, right: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: |accuracy - confidence| per equal-width bin, weighted by its share."""
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.mean() * abs(right[m].mean() - conf[m].mean())
    return float(total)


def fit_temperature(g: dict) -> float:
    """The T of T_GRID with the lowest log-loss of confidence as P(answer right)."""
    right = np.asarray(g["right"], dtype=np.float64)
    best, best_t = np.inf, 1.0
    for t in T_GRID:
        c = np.clip(confidences(g, float(t)), 1e-6, 1 - 1e-6)
        nll = -float(np.mean(right * np.log(c) + (1 - right) * np.log(1 - c)))
        if nll < best:
            best, best_t = nll, float(t)
    return best_t


def coverage_curve(conf: np.ndarray, right: np.ndarray, fallback_right: np.ndarray | None = None) -> list[dict]:
    """For each threshold (every distinct confidence, and above all): the share the student
    answers, its accuracy on them, and the accuracy with the rest answered by the fallback."""
    out = []
    for th in [*sorted(set(conf.tolist())), NEVER]:
        mine = conf >= th
        row = {
            "threshold": th,
            "coverage": float(mine.mean()),
            "accuracy_answered": float(right[mine].mean()) if mine.any() else None,
        }
        if fallback_right is not None:
            row["routed_accuracy"] = float(np.where(mine, right, fallback_right).mean())
        out.append(row)
    return out


def choose_threshold(curve: list[dict], teacher_accuracy: float, max_drop: float) -> dict:
    """The curve point with the most student answers whose routed accuracy is within `max_drop`
    of the teacher's (sending everything to the teacher always qualifies)."""
    ok = [r for r in curve if r["routed_accuracy"] >= teacher_accuracy - max_drop - 1e-12]
    return max(ok, key=lambda r: (r["coverage"], -r["threshold"]))


def per_bucket_ece(conf: np.ndarray, right: np.ndarray, buckets: list[str]) -> dict[str, float]:
    b = np.asarray(buckets)
    return {k: ece(conf[b == k], right[b == k]) for k in sorted(set(buckets))}


def calibrate(student: dict, teacher_right: list[bool], examples: list[TaskExample], max_drop: float = 0.01) -> dict:
    """Temperature, ECE before/after (overall and per bucket), curve and threshold, from the
    student's `graded_with_stats` and the teacher's right/wrong on the same examples."""
    right = np.asarray(student["right"], dtype=np.float64)
    t_right = np.asarray(teacher_right, dtype=np.float64)
    temperature = fit_temperature(student)
    raw, scaled = confidences(student, 1.0), confidences(student, temperature)
    curve = coverage_curve(scaled, right, t_right)
    pick = choose_threshold(curve, float(t_right.mean()), max_drop)
    return {
        "confidence": "lowest answer-token probability",
        "temperature": temperature,
        "examples": len(examples),
        "ece_before": ece(raw, right),
        "ece_after": ece(scaled, right),
        "ece_per_bucket": per_bucket_ece(scaled, right, [e.bucket for e in examples]),
        "student_accuracy": float(right.mean()),
        "teacher_accuracy": float(t_right.mean()),
        "threshold": pick["threshold"],
        "coverage": pick["coverage"],
        "accuracy_answered": pick["accuracy_answered"],
        "routed_accuracy": pick["routed_accuracy"],
        "target": f"student + teacher within {max_drop:.0%} of the teacher's accuracy",
        "curve": curve,
    }
