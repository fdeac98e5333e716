"""Healing: a short distillation of a pruned model from the teacher, as the prune stage's
`heal(src, out, steps)` callback (the prune stage never imports the stage after it; the pipeline
and the CLI hand it this)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from toolchain.config import DataConfig, DistillConfig, TaskConfig, TeacherConfig


def make_heal(
    teacher: Callable,
    data: DataConfig,
    cfg: DistillConfig,
    shared_dir: Path,
    teacher_cfg: TeacherConfig | None = None,
    task: TaskConfig | None = None,
    echo: Callable[[str], None] = print,
) -> Callable[[Path, Path, int], None]:
    """A heal that distils with the run's settings for the given steps, in this process alone
    (under a launcher the other processes wait for the distill stage), with no evaluation
    between before and after. Teacher data that does not depend on the student (a top-k cache,
    the teacher's answers) is kept in `shared_dir` and reused by every heal."""
    from toolchain.devices.parallel import SINGLE
    from toolchain.distill.run import distill_student

    data = dataclasses.replace(data, cache_dir=data.cache_dir or str(shared_dir))

    def heal(src: Path, out: Path, steps: int) -> None:
        c = dataclasses.replace(cfg, steps=steps, warmup_steps=min(cfg.warmup_steps, steps // 4), eval_every=0)
        echo(f"  healing {src.name}: {steps} distillation steps")
        res = distill_student(
            teacher,
            src,
            out,
            data,
            c,
            out.with_name(f"{out.name}.work"),
            progress=False,
            teacher_cfg=teacher_cfg,
            task=task,
            par=SINGLE,
        )
        echo(f"  held-out KL {res['before']['kl']:.3f} -> {res['after']['kl']:.3f}")

    return heal
