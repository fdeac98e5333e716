"""How much of the fine-tuned teacher's task skill a distilled student keeps, through the GGUF each ships as.

One run, every model measured the same way: its GGUF in llama.cpp, greedy, on the task's eval
split (never trained on), graded per bucket by the task's grader.

  base teacher        the bundled teacher as it is (F16 GGUF)
  fine-tuned teacher  LoRA on the train split, merged (F16 GGUF)
  student, before     depth-pruned from the fine-tuned teacher, untrained (--student-quant GGUF)
  student, SFT only   the same student trained on the gold answers, --steps steps
  student, distilled  the same student trained on the teacher's answers with its logits, same steps

With --pruned, a sixth and seventh row: the fine-tuned teacher cut to the depth student's
parameter count by width + depth (prune/, activation importance on the task's calibration
prompts, one cut), before and after the same distillation (issue 16's task retention).

Stages write into --out and are skipped when their output is there, so a stopped run resumes.
Prints the table, then one JSON line. Run `make task-data` first (it builds .data/spam-assassin.jsonl).

    .venv/bin/python benchmarks/task_retention.py [--config examples/task-spam.yaml] [--set key=value ...]
        [--pruned] [--no-sft]
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


def _pruned(cfg, teacher_dir: Path, depth_student: Path, out: Path) -> dict:
    """The fine-tuned teacher cut to the depth student's parameter count by width + depth
    (activation importance on the task's calibration prompts, the budget search over depths),
    in one cut as the depth student is made."""
    from toolchain.config import PruneConfig
    from toolchain.models.load import load_model
    from toolchain.prune import prune_student
    from toolchain.student import calibration_rows

    if (out / "config.json").is_file():
        return {"path": str(out)}
    teacher = load_model(str(teacher_dir))
    budget = _params(depth_student)
    calib = calibration_rows(teacher.tokenizer, cfg.data, cfg.task, cfg.prune.calib_sequences)  # as the pipeline
    prune = PruneConfig(enabled=True, params=budget, depth=True, calib_sequences=cfg.prune.calib_sequences)
    rec = prune_student(teacher_dir, out, prune, calib, out.with_name(out.name + ".work"))
    return {k: rec.get(k) for k in ("shape", "params", "params_before", "heldout_kl", "candidates")}


def _params(model_dir: Path) -> int:
    from toolchain.models.load import count_params, load_model

    return count_params(load_model(str(model_dir)).model)


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
    p.add_argument("--no-sft", dest="sft", action="store_false", help="skip the student trained on gold answers")
    p.add_argument(
        "--pruned",
        action="store_true",
        help="also a width+depth pruned student of the depth student's size, distilled the same way",
    )
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
    runs = [("student-kd", "student-init", "teacher")]
    if args.sft:
        runs.insert(0, ("student-sft", "student-init", "gold"))
    pruned = None
    if args.pruned:
        pruned = timed("student-pruned", lambda: _cached(out / "student-pruned.json", lambda: _pruned(
            cfg, ft_dir, out / "student-init", out / "student-pruned")))  # fmt: skip
        runs.append(("student-pruned-kd", "student-pruned", "teacher"))
    for name, src, targets in runs:
        timed(name, lambda n=name, s=src, t=targets: _cached(out / f"{n}.json", lambda: _distilled(
            cfg, ft_dir, out / s, out / n, t)))  # fmt: skip

    q = args.student_quant
    models = {"base teacher": (base_dir, "F16"), "fine-tuned teacher": (ft_dir, "F16")}
    models["student, before"] = (out / "student-init", q)
    if args.sft:
        models["student, SFT only"] = (out / "student-sft", q)
    models["student, distilled"] = (out / "student-kd", q)
    if pruned is not None:
        models["width+depth pruned, before"] = (out / "student-pruned", q)
        models["width+depth pruned, distilled"] = (out / "student-pruned-kd", q)
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
    print(
        f"\nretention (distilled / fine-tuned teacher): macro {ret['macro']:.1%}, lowest bucket {ret['min_bucket']:.1%}"
    )
    result = {
        "base_teacher_acc": s["base teacher"]["macro"],
        "teacher_acc": teacher["macro"],
        "student_before_acc": s["student, before"]["macro"],
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
    if args.sft:
        sft_ret = retention(s["student, SFT only"], teacher)
        print(f"retention (SFT only / fine-tuned teacher): macro {sft_ret['macro']:.1%}")
        result.update(student_sft_acc=s["student, SFT only"]["macro"], sft_retention=sft_ret["macro"])
    if pruned is not None:
        p_ret = retention(s["width+depth pruned, distilled"], teacher)
        print(
            f"retention (width+depth pruned {pruned['shape']}, distilled / fine-tuned teacher): "
            f"macro {p_ret['macro']:.1%}, lowest bucket {p_ret['min_bucket']:.1%}"
        )
        depth_params = _params(out / "student-init")
        result.update(
            pruned_kd_acc=s["width+depth pruned, distilled"]["macro"],
            pruned_before_acc=s["width+depth pruned, before"]["macro"],
            pruned_retention=p_ret["macro"],
            pruned_min_bucket_retention=p_ret["min_bucket"],
            pruned_shape=pruned["shape"],
            pruned_params=pruned["params"],
            depth_params=depth_params,
            pruned_gguf_bytes=files["width+depth pruned, distilled"]["bytes"],
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
