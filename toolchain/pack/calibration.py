"""The bundle's confidence threshold, measured on the run's calibration split.

The shipped GGUF answers the calibration split in llama.cpp (as the app's router will run it);
the teacher the run distilled from answers the same examples; `eval.calibrate` fits the
temperature and picks the threshold that keeps student + teacher within `max_drop` of the
teacher's accuracy while the student answers as much as it can.
"""

from __future__ import annotations

from pathlib import Path

MIN_EXAMPLES = 10


def teacher_dir(run_dir: Path, config) -> Path:
    """The teacher the run distilled from: the fine-tuned one when finetune ran."""
    import json

    from toolchain.models.load import resolve_model_dir

    ft = run_dir / "stages" / "finetune.json"
    tuned = json.loads(ft.read_text()).get("path") if ft.is_file() else None
    return Path(tuned) if tuned else Path(resolve_model_dir(config.teacher.model))


def calibrate_bundle_model(run_dir: Path, config, gguf, max_drop: float, echo=print) -> dict | None:
    from toolchain.eval.calibrate import calibrate, graded_with_stats
    from toolchain.eval.run import evaluate_model
    from toolchain.models.artifacts import describe_model

    calib = config.task.splits().calib
    if len(calib) < MIN_EXAMPLES:
        echo(
            f"  warning: no fallback threshold: it needs >= {MIN_EXAMPLES} calibration examples, the task has "
            f"{len(calib)} (raise task.calib_fraction)"
        )
        return None
    student = graded_with_stats(gguf, calib, config.task, run_dir / "student")
    teacher = evaluate_model(describe_model(teacher_dir(run_dir, config)), calib, config.task)
    _, right = _graded(calib, teacher["answers"], config.task)
    cal = calibrate(student, right, calib, max_drop)
    cal["model"] = f"gguf {gguf['quant']}"
    echo(
        f"  calibration ({len(calib)} examples): T {cal['temperature']:.2f}, ECE {cal['ece_before']:.3f} -> "
        f"{cal['ece_after']:.3f}; threshold {cal['threshold']:.3f}: student answers {cal['coverage']:.0%}, "
        f"routed accuracy {cal['routed_accuracy']:.1%} vs teacher {cal['teacher_accuracy']:.1%}"
    )
    return cal


def _graded(examples, answers, task):
    from toolchain.eval.score import score

    return score(examples, answers, task.grader, task.bucket_graders)
