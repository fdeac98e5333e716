"""Healing: a short distillation of a pruned model from the teacher, as the prune stage's
`heal(src, out, steps)` callback (the prune stage never imports the stage after it; the pipeline
and the CLI hand it this)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from toolchain.config import DataConfig, DistillConfig, PruneConfig, TaskConfig, TeacherConfig


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


def prune_again(
    distilled: Path,
    out: Path,
    second: PruneConfig,
    calib,
    work: Path,
    heal: Callable[[Path, Path, int], None],
    teacher: Callable,
    data: DataConfig,
    cfg: DistillConfig,
    progress: bool = True,
    teacher_cfg: TeacherConfig | None = None,
    task: TaskConfig | None = None,
    echo: Callable[[str], None] = print,
) -> tuple[dict, list]:
    """Cut a distilled student again (`second`, healed between rounds by `heal`) and heal the
    result with a second distillation of `cfg.steps` into `out`, in this process alone (under a
    launcher the other processes ended with the distill stage). Returns the pruning record with
    the healing's before/after figures, and the healing's history."""
    from toolchain.devices.parallel import SINGLE
    from toolchain.distill.run import distill_student
    from toolchain.prune import prune_student

    cut = work / "student-pruned-again"
    res = prune_student(distilled, cut, second, calib, work / "prune-again", heal=heal)
    echo(
        f"pruned again to {res['shape']} ({res['params_before'] / 1e6:.1f} -> {res['params'] / 1e6:.1f} M "
        f"params), held-out KL to the distilled student {res['heldout_kl']:.3f}"
    )
    healed = distill_student(
        teacher, cut, out, data, cfg, work / "distill-again", progress, teacher_cfg=teacher_cfg, task=task, par=SINGLE
    )
    history = healed.pop("history")
    b, a = healed["before"], healed["after"]
    echo(f"  healed {cfg.steps} steps: held-out KL {b['kl']:.3f} -> {a['kl']:.3f}")
    res["healed"] = {"steps": cfg.steps, "before": b, "after": a}
    return res, history
