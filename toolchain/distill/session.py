"""What one `distill` call (toolchain/distill/loop.py) carries through its steps: the run's
fixed setup, and the parts its steps and evaluations share. Kept apart so the loop itself
stays a short read."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from toolchain.config import DistillConfig
from toolchain.devices.parallel import Parallel, all_sum
from toolchain.devices.placement import place
from toolchain.distill.batch import Batch
from toolchain.distill.evaluate import evaluate
from toolchain.distill.guard import DivergenceGuard
from toolchain.distill.hidden import HiddenMatcher
from toolchain.distill.losses import LossSpec
from toolchain.distill.onpolicy import is_on_policy, on_policy_batch
from toolchain.distill.state import TrainState

BatchFn = Callable[[int], Batch]


@dataclass
class RunSetup:
    """The run's fixed parts, built once: where it runs, what trains, how."""

    device: torch.device
    home: torch.device  # where the caller gets the student back (saving, LoRA merge)
    spec: LossSpec
    hidden: HiddenMatcher | None
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    autocast: torch.autocast


@dataclass
class Session:
    """What the steps and evaluations of one invocation share once the run is set up."""

    teacher: torch.nn.Module | None
    student: torch.nn.Module
    batch_fn: BatchFn
    eval_sets: dict
    cfg: DistillConfig
    par: Parallel
    run: RunSetup
    ckpt_path: Path
    guard: DivergenceGuard
    eval_every: int
    state: TrainState
    eos: list[int]
    bar: tqdm

    @property
    def primary(self) -> str:
        """The eval set of the before/after figures and of the divergence guard."""
        return next(iter(self.eval_sets))

    def evaluate_all(self) -> dict | None:
        # the processes hold equal weights, so process 0 evaluates for all of them
        if not self.par.main:
            return None
        return {name: evaluate(self.student, self.teacher, data) for name, data in self.eval_sets.items()}

    def stop_if_diverged(self, step: int, figures: dict | None) -> None:
        """Stop (on every process) when the guard sees the held-out figures running away."""
        reason = self.guard.observe(step, figures[self.primary], self.student) if figures is not None else None
        if not all_sum(self.par, 1.0 if reason else 0.0):
            return
        self.bar.close()
        self.guard.restore_best(self.student)
        place(self.student, self.run.home)
        # only process 0 evaluates: the others stop on its verdict, without figures of their own
        raise self.guard.error(
            reason or "process 0's held-out figures diverged",
            step,
            figures[self.primary] if figures is not None else None,
            self.state.history,
            self.ckpt_path,
            self.cfg.lr,
            self.cfg.warmup_steps,
            main=self.par.main,
        )

    def next_batch(self, m: int) -> Batch:
        """Micro-batch m on the run's device; the student's own continuation on on-policy steps."""
        b = self.batch_fn(m).to(self.run.device)
        return on_policy_batch(self.student, b, self.cfg, m, self.eos) if is_on_policy(self.cfg, m) else b


@dataclass
class Throughput:
    """Tokens and seconds of the steps after this invocation's first (for tokens/s)."""

    tokens: int = 0
    seconds: float = 0.0
