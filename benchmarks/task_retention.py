"""How much of the fine-tuned teacher's task skill a distilled student keeps, through the GGUF each ships as.

One run, every model measured the same way: its GGUF in llama.cpp, greedy, on the task's eval
split (never trained on), graded per bucket by the task's grader.

  base teacher        the bundled teacher as it is (F16 GGUF)
  fine-tuned teacher  LoRA on the train split, merged (F16 GGUF)
  student, before     depth-pruned from the fine-tuned teacher, untrained (--student-quant GGUF)
  student, SFT only   the same student trained on the gold answers, --steps steps
  student, distilled  the same student trained on the teacher's answers with its logits, same steps

Stages write into --out and are skipped when their output is there, so a stopped run resumes.
Prints the table, then one JSON line. Run `make task-data` first (it builds .data/spam-assassin.jsonl).

    .venv/bin/python benchmarks/task_retention.py [--config examples/task-spam.yaml] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _gguf(model_dir: Path, out: Path, quant: str) -> dict:
    from toolchain.export.gguf import export_gguf, gguf_filename

    path = out / gguf_filename(quant)
    if path.is_file():
        from toolchain.models.artifacts import describe_model

        return dict(describe_model(path))
    return dict(export_gguf(model_dir, out, [quant])[0])


def _cached(path: Path, make):
    if path.is_file():
        return json.loads(path.read_text())
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")
    return value


def _student(cfg, teacher_dir: Path, out: Path, splits) -> dict:
    from toolchain.models.load import load_model
    from toolchain.student import build_student, task_calibration

    if (out / "config.json").is_file():
        return {"path": str(out)}
    teacher = load_model(str(teacher_dir))
    calib = task_calibration(teacher.tokenizer, splits.calib, cfg.data.seq_len, cfg.student.calib_sequences)
    return build_student(teacher, out, cfg.student.keep_layers, calib, cfg.student.selection)


def _distilled(cfg, teacher_dir: Path, student_dir: Path, out: Path, targets: str) -> dict:
    import dataclasses

    from toolchain.config import TeacherConfig
    from toolchain.distill.run import distill_student
    from toolchain.models.load import teacher_from_config

    if (out / "config.json").is_file():
        return {"path": str(out)}
    data = dataclasses.replace(cfg.data, mode="task", task_targets=targets)
    t_cfg = TeacherConfig(model=str(teacher_dir))
    res = distill_student(
        lambda: teacher_from_config(t_cfg), student_dir, out, data, cfg.distill, out.with_name(out.name + ".work"),
        progress=False, teacher_cfg=t_cfg, task=cfg.task,
    )  # fmt: skip
    res.pop("history", None)
    return {k: res.get(k) for k in ("steps", "tokens", "seconds", "tokens_per_s", "before", "after")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "examples" / "task-spam.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=str(ROOT / "runs" / "task-retention"))
    p.add_argument("--student-quant", default="Q8_0", help="GGUF type the student ships as")
    args = p.parse_args(argv)

    from toolchain.config import load_config
    from toolchain.eval.run import evaluate_model
    from toolchain.eval.score import format_table, retention
    from toolchain.finetune.run import finetune_teacher
    from toolchain.models.load import resolve_model_dir

    t0 = time.perf_counter()
    cfg = load_config(args.config, args.set)
    out = Path(args.out)
    splits = cfg.task.splits()
    counts = {b: sum(e.bucket == b for e in splits.eval) for b in splits.buckets()}
    print(f"task: {len(splits.train)} train / {len(splits.calib)} calib / {len(splits.eval)} eval {counts}")
    stage_seconds: dict[str, float] = {}

    def timed(name, fn):
        s = time.perf_counter()
        value = fn()
        stage_seconds[name] = round(time.perf_counter() - s, 1)
        print(f"  {name}: {stage_seconds[name]:.0f} s", flush=True)
        return value

    base_dir = resolve_model_dir(cfg.teacher.model)
    ft_dir = out / "teacher-finetuned"
    timed("finetune", lambda: _cached(out / "finetune.json", lambda: finetune_teacher(
        cfg.teacher, splits.train, ft_dir, cfg.finetune, out / "finetune.work")))  # fmt: skip
    timed("student", lambda: _student(cfg, ft_dir, out / "student-init", splits))
    for name, targets in (("student-sft", "gold"), ("student-kd", "teacher")):
        timed(name, lambda n=name, t=targets: _cached(out / f"{n}.json", lambda: _distilled(
            cfg, ft_dir, out / "student-init", out / n, t)))  # fmt: skip

    models = {
        "base teacher": (base_dir, "F16"),
        "fine-tuned teacher": (ft_dir, "F16"),
        "student, before": (out / "student-init", args.student_quant),
        "student, SFT only": (out / "student-sft", args.student_quant),
        "student, distilled": (out / "student-kd", args.student_quant),
    }
    files = {}
    for name, (d, q) in models.items():
        files[name] = timed(
            f"export {name}", lambda d=d, q=q, n=name: _gguf(d, out / "gguf" / n.replace(" ", "-").replace(",", ""), q)
        )
    scores = {}
    for name, (d, _) in models.items():
        r = timed(f"eval {name}", lambda n=name, d=d: evaluate_model(files[n], splits.eval, cfg.task, tokenizer_dir=d))
        scores[f"{name} ({files[name]['quant']})"] = r["score"]
    print()
    print(format_table(scores, "task accuracy on the eval split, each model's GGUF in llama.cpp:"))
    s = {k.rsplit(" (", 1)[0]: v for k, v in scores.items()}
    teacher, kd = s["fine-tuned teacher"], s["student, distilled"]
    ret = retention(kd, teacher)
    sft_ret = retention(s["student, SFT only"], teacher)
    print(
        f"\nretention (distilled / fine-tuned teacher): macro {ret['macro']:.1%}, lowest bucket {ret['min_bucket']:.1%}"
    )
    print(f"retention (SFT only / fine-tuned teacher): macro {sft_ret['macro']:.1%}")
    result = {
        "base_teacher_acc": s["base teacher"]["macro"],
        "teacher_acc": teacher["macro"],
        "student_before_acc": s["student, before"]["macro"],
        "student_sft_acc": s["student, SFT only"]["macro"],
        "student_kd_acc": kd["macro"],
        "retention": ret["macro"],
        "min_bucket_retention": ret["min_bucket"],
        "bucket_retention": ret["buckets"],
        "student_gguf_bytes": files["student, distilled"]["bytes"],
        "student_quant": args.student_quant,
        "teacher_f16_bytes": files["fine-tuned teacher"]["bytes"],
        "eval_examples": len(splits.eval),
        "stage_seconds": stage_seconds,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
