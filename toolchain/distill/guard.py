"""The divergence guard: stop a distillation that makes the student clearly worse.

A learning rate that suits one model can wreck another (a real Qwen2.5-0.5B student went from
held-out KL 5.3 to 37 in 8 steps at the lr that suits SmolLM2), and the loss on training
batches alone does not show it early. So the loop evaluates the held-out set every
`eval_every` steps; when held-out KL or CE exceeds `divergence_ratio` times its best value so
far (or is not finite), training stops, the best weights are restored into the student, and
the run fails with the figures and what to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from toolchain.errors import DivergenceError

WATCHED = ("kl", "ce")


def resolve_eval_every(eval_every: int | str, steps: int) -> int:
    """`auto`: about five evaluations per run, so the guard sees a divergence early but
    evaluation stays a small share of the run; an int is taken as given (0: none between)."""
    if eval_every == "auto":
        return max(1, math.ceil(steps / 5)) if steps else 0
    return int(eval_every)


def _cpu_copy(module: torch.nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


@dataclass
class DivergenceGuard:
    ratio: float  # 0 turns the guard off (figures are still tracked)
    best: dict | None = None  # {"step", "kl", "ce"} of the evaluation with the lowest KL (else CE)
    lowest: dict = field(default_factory=dict)  # the lowest value seen of each watched figure
    best_state: dict | None = field(default=None, repr=False)

    def observe(self, step: int, figures: dict, student: torch.nn.Module) -> str | None:
        """Record the held-out `figures` at `step`; the reason to stop, or None."""
        values = {k: float(figures[k]) for k in WATCHED if figures.get(k) is not None}
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            return f"held-out {bad[0].upper()} is not finite at step {step}"
        rising = [k for k, v in values.items() if self.ratio and k in self.lowest and v > self.ratio * self.lowest[k]]
        if rising:
            k = rising[0]
            return (
                f"held-out {k.upper()} rose to {values[k]:.3f} at step {step}, above {self.ratio:g} x its "
                f"lowest value {self.lowest[k]:.3f}"
            )
        key = "kl" if "kl" in values else "ce"
        if self.best is None or values.get(key, math.inf) < self.best.get(key, math.inf):
            self.best = {"step": step, **values}
            self.best_state = _cpu_copy(student)
        for k, v in values.items():
            self.lowest[k] = min(v, self.lowest.get(k, math.inf))
        return None

    def restore_best(self, student: torch.nn.Module) -> None:
        if self.best_state is not None:
            student.load_state_dict(self.best_state)

    def error(
        self,
        reason: str,
        step: int,
        figures: dict | None,
        history: list,
        ckpt_path,
        lr: float,
        warmup: int,
        main: bool = True,
    ):
        """The error that stops a diverging run, the student already holding the best weights.

        The last checkpoint holds the diverged weights and optimizer: process 0 (`main`) moves it
        aside, so that a rerun (with a lower lr) starts from the initial student instead of
        resuming into them.
        """
        if main and ckpt_path.is_file():
            ckpt_path.replace(ckpt_path.with_name("checkpoint.diverged.pt"))
        last = {"step": step, **{k: figures[k] for k in WATCHED if figures and k in figures}}
        best = self.best or {}

        def fig(d: dict) -> str:
            return ", ".join(f"{k.upper()} {d[k]:.3f}" for k in WATCHED if d.get(k) is not None)

        message = (
            f"distillation diverged: {reason}. Best: step {best.get('step', '?')} ({fig(best)}); "
            f"last: step {step} ({fig(last)}). Lower distill.lr (now {lr:g}; "
            f"try {lr / 10:g}) or raise distill.warmup_steps (now {warmup})"
        )
        figures_out = {
            "reason": reason,
            "best": best,
            "last": last,
            "history": history,
            "kept_best_weights": self.best_state is not None,
        }
        return DivergenceError(message, figures_out)
