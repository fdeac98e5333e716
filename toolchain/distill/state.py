"""What a distillation run carries from step to step, and its checkpoint.

`TrainState` holds the counters and figures; `save_checkpoint` writes it atomically together
with the student, optimizer, scheduler, hidden-state projection, the guard's best figures and
each process's RNG states (so sampling resumes where it was); `load_checkpoint` restores all of
them. The best weights themselves are not in the checkpoint (a second copy of the model): after
a resume the guard keeps the next best it sees.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from toolchain.config import DistillConfig
from toolchain.devices.parallel import Parallel, gather
from toolchain.fileio import atomic_path

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainState:
    step: int = 0
    history: list = field(default_factory=list)
    before: dict | None = None  # {eval set: figures} before the first step
    train_seconds: float = 0.0
    tokens: int = 0


def _rng_states() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path: Path, state: TrainState, student, optimizer, scheduler, hidden, guard, par: Parallel) -> None:
    """Write the run's state on process 0 (every process must call it: the RNG states are gathered)."""
    rng_ranks = gather(par, _rng_states())
    if not par.main:
        return
    with atomic_path(path) as tmp:
        torch.save(
            {
                "model": student.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng_ranks": rng_ranks,
                "step": state.step,
                "history": state.history,
                "before": state.before,
                "train_seconds": state.train_seconds,
                "tokens": state.tokens,
                "guard": {"best": guard.best, "lowest": guard.lowest},
                "hidden_proj": hidden.state_dict() if hidden is not None else None,
            },
            tmp,
        )


def load_checkpoint(path: Path, student, optimizer, scheduler, hidden, guard, par: Parallel) -> TrainState:
    """Restore everything `save_checkpoint` wrote; returns the state to continue from."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    student.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if hidden is not None and ckpt.get("hidden_proj") is not None:
        hidden.load_state_dict(ckpt["hidden_proj"])
    ranks = ckpt["rng_ranks"]
    # a run resumed with another process count: each process continues from process 0's states
    _set_rng_states(ranks[par.rank] if len(ranks) == par.world else ranks[0])
    guard.best, guard.lowest = ckpt["guard"]["best"], ckpt["guard"]["lowest"]
    return TrainState(ckpt["step"], ckpt["history"], ckpt["before"], ckpt["train_seconds"], ckpt["tokens"])


def nonfinite_message(loss: float, grad_norm: float, step: int, ckpt_path: Path, cfg: DistillConfig) -> str:
    """Why a step was refused, what was kept, and what to change."""
    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
    if ckpt_path.is_file():
        last = torch.load(ckpt_path, map_location="cpu", weights_only=False)["step"]
        kept = f"the last good checkpoint (step {last}) is kept in {ckpt_path}; rerunning resumes from it"
    else:
        kept = "no checkpoint had been written yet"
    return (
        f"distillation stopped at step {step}: {what} is not finite, so this step was not applied; {kept}. "
        f"Lower distill.lr (now {cfg.lr}), keep distill.grad_clip > 0, or check the data."
    )
