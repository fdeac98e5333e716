"""Student + teacher fallback, and disagreement mining, on the example task (after task_retention.py).

Uses the GGUFs benchmarks/task_retention.py left in --run (same --config / --set, so the same
splits): the distilled student's GGUF and the fine-tuned teacher's F16 GGUF, both in llama.cpp.

  1. calibration split: the student's confidence (lowest answer-token probability), temperature
     fitted, threshold chosen so student + teacher stay within --max-drop of the teacher;
  2. eval split (never trained on, never used to choose anything): accuracy of the teacher alone,
     the student alone and the routed pair at that threshold, the share sent to the teacher, and
     the coverage-vs-accuracy curve (printed, and plotted to --run/fallback_curve.png);
  3. disagreement: eval prompts ranked by student/teacher answer mismatch, then student confidence;
     the student's error rate among the top --top-share vs a seeded random set of the same size.

Prints the tables, then one JSON line.

    .venv/bin/python benchmarks/fallback.py [--run runs/task-retention] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _plot(curve_eval: list[dict], teacher_acc: float, chosen: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in curve_eval if r["accuracy_answered"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["coverage"] for r in pts], [r["accuracy_answered"] for r in pts], label="student, on what it answers")
    ax.plot([r["coverage"] for r in curve_eval], [r["routed_accuracy"] for r in curve_eval], label="student + teacher")
    ax.axhline(teacher_acc, color="grey", ls="--", label="teacher alone")
    ax.axvline(chosen["coverage"], color="red", ls=":", label="chosen threshold")
    ax.set_xlabel("share answered by the student (coverage)")
    ax.set_ylabel("accuracy (eval split)")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "examples" / "task-spam.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--run", default=str(ROOT / "runs" / "task-retention"), help="task_retention.py's --out")
    p.add_argument("--student-quant", default="Q8_0")
    p.add_argument("--max-drop", type=float, default=0.01)
    p.add_argument("--top-share", type=float, default=0.1, help="share of eval prompts in the disagreement set")
    args = p.parse_args(argv)

    from toolchain.config import load_config
    from toolchain.eval.calibrate import calibrate, confidences, coverage_curve, graded_with_stats
    from toolchain.eval.disagree import random_rows, rank
    from toolchain.eval.run import evaluate_model
    from toolchain.eval.score import score
    from toolchain.models.artifacts import describe_model

    t0 = time.perf_counter()
    cfg = load_config(args.config, args.set)
    run = Path(args.run)
    splits = cfg.task.splits()
    student = describe_model(run / "gguf" / "student-distilled" / f"model-{args.student_quant}.gguf")
    teacher = describe_model(run / "gguf" / "fine-tuned-teacher" / "model-F16.gguf")
    s_tok, t_tok = run / "student-kd", run / "teacher-finetuned"
    print(f"calibration {len(splits.calib)} / eval {len(splits.eval)} examples; student {student['path']}")

    def teacher_right(examples):
        r = evaluate_model(teacher, examples, cfg.task, tokenizer_dir=t_tok)
        return r["answers"], score(examples, r["answers"], cfg.task.grader, cfg.task.bucket_graders)[1]

    s_cal = graded_with_stats(student, splits.calib, cfg.task, s_tok)
    _, t_cal_right = teacher_right(splits.calib)
    cal = calibrate(s_cal, t_cal_right, splits.calib, args.max_drop)
    s_eval = graded_with_stats(student, splits.eval, cfg.task, s_tok)
    t_answers, t_eval_right = teacher_right(splits.eval)

    right, t_right = np.asarray(s_eval["right"], float), np.asarray(t_eval_right, float)
    conf = confidences(s_eval, cal["temperature"])
    mine = conf >= cal["threshold"]
    routed = np.where(mine, right, t_right)
    curve = coverage_curve(conf, right, t_right)
    _plot(curve, float(t_right.mean()), {"coverage": float(mine.mean())}, run / "fallback_curve.png")

    print(
        f"\ntemperature {cal['temperature']:.2f}; ECE on calibration {cal['ece_before']:.3f} -> {cal['ece_after']:.3f}"
    )
    print(f"threshold {cal['threshold']:.4f} (calibration: student answers {cal['coverage']:.1%}, "
          f"routed {cal['routed_accuracy']:.1%} vs teacher {cal['teacher_accuracy']:.1%})")  # fmt: skip
    print("\ncoverage vs accuracy on the eval split:")
    print(f"{'coverage':>9} {'threshold':>10} {'student acc':>12} {'routed acc':>11}")
    for target in (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.0):
        r = min(curve, key=lambda r: abs(r["coverage"] - target))
        acc = "-" if r["accuracy_answered"] is None else f"{r['accuracy_answered']:.1%}"
        print(f"{r['coverage']:>9.1%} {r['threshold']:>10.4f} {acc:>12} {r['routed_accuracy']:>11.1%}")
    print(f"(plot: {run / 'fallback_curve.png'})")

    chats = [e.prompt for e in splits.eval]
    rows = rank(chats, s_eval["answers"], t_answers, conf.tolist())
    n = max(1, round(args.top_share * len(rows)))
    err = lambda sel: float(np.mean([1.0 - right[r["index"]] for r in sel]))
    top_err, rand_err = err(rows[:n]), err(random_rows(rows, n, seed=0))
    print(f"\n{'on the eval split':<34} {'accuracy':>9} {'to teacher':>11}")
    print(f"{'teacher alone (F16)':<34} {t_right.mean():>9.1%} {1.0:>11.0%}")
    print(f"{'student alone (' + args.student_quant + ')':<34} {right.mean():>9.1%} {0.0:>11.0%}")
    print(f"{'student + teacher fallback':<34} {routed.mean():>9.1%} {1 - mine.mean():>11.1%}")
    n_dis = sum(r["disagree"] for r in rows)
    print(
        f"\ndisagreement: student errors among the top {n} ({args.top_share:.0%}) {top_err:.1%} vs random {n} "
        f"{rand_err:.1%} (all: {1 - right.mean():.1%}); {n_dis} prompts disagree"
    )
    result = {
        "teacher_acc": float(t_right.mean()),
        "student_acc": float(right.mean()),
        "routed_acc": float(routed.mean()),
        "teacher_share": float(1 - mine.mean()),
        "threshold": cal["threshold"],
        "temperature": cal["temperature"],
        "ece_before": cal["ece_before"],
        "ece_after": cal["ece_after"],
        "calib_examples": len(splits.calib),
        "eval_examples": len(splits.eval),
        "disagree_top_n": n,
        "disagree_error_rate": top_err,
        "random_error_rate": rand_err,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
