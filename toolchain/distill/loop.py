"""The distillation training loop, written out (no framework Trainer).

Resumable: every `checkpoint_every` steps the student, optimizer, scheduler, RNG states and
the step counter (which fixes the data position, since the data order is a seeded permutation)
are written atomically to `work_dir/checkpoint.pt`; a rerun continues from there.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from toolchain.config import DistillConfig
from toolchain.distill.evaluate import evaluate
from toolchain.distill.losses import kd_loss
from toolchain.errors import UserError
from toolchain.fileio import atomic_path

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


def keep_freed_memory() -> None:
    """Stop glibc from returning the large per-step logits buffers to the kernel.

    Each KD step allocates ~100 MB vocabulary-sized logits; by default glibc unmaps and
    re-faults them every step, which measured at 17-25% of CPU time here (DESIGN.md).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: serve big blocks from the heap, not fresh mmaps
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: do not give the heap back eagerly
    except (OSError, AttributeError):
        pass


def lr_lambda(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Blocks for `step`: a fresh seeded permutation per epoch, so the order is reproducible."""
    out = []
    pos = step * batch_size
    for k in range(batch_size):
        epoch, i = divmod(pos + k, n)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        out.append(int(torch.randperm(n, generator=g)[i]))
    return torch.tensor(out)


def check_same_vocabulary(teacher_tok, student_tok) -> None:
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise UserError(
            "teacher and student tokenizers differ; logit distillation needs a shared tokenizer "
            "(make the student from the teacher with `toolchain student`)"
        )


def distill(teacher, student, train: torch.Tensor, heldout: torch.Tensor, cfg: DistillConfig,
            work_dir: str | os.PathLike, progress: bool = True) -> dict:
    """Train `student` towards `teacher` on packed token blocks; returns figures for the report."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    keep_freed_memory()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if len(train) < cfg.batch_size:
        raise UserError(f"only {len(train)} training blocks for distill.batch_size={cfg.batch_size}; use more text or a smaller batch")
    torch.manual_seed(cfg.seed)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, cfg.warmup_steps, cfg.steps))

    ckpt_path = work_dir / CHECKPOINT
    start_step, history, before, train_seconds = 0, [], None, 0.0
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        student.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        start_step, history, before = ckpt["step"], ckpt["history"], ckpt["before"]
        train_seconds = ckpt.get("train_seconds", 0.0)
        log.info("resuming distillation from step %d (%s)", start_step, ckpt_path)
    if before is None:
        before = evaluate(student, teacher, heldout)

    def save_checkpoint(step: int) -> None:
        with atomic_path(ckpt_path) as tmp:
            torch.save(
                {"model": student.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": torch.get_rng_state(), "step": step, "history": history, "before": before,
                 "train_seconds": train_seconds},
                tmp,
            )

    seq_tokens = train.shape[1] - 1
    bar = tqdm(total=cfg.steps, initial=start_step, desc="distill", disable=not progress, unit="step")
    student.train()
    steady_tokens, steady_seconds = 0, 0.0
    for step in range(start_step, cfg.steps):
        t0 = time.perf_counter()
        x = train[_batch_indices(step, cfg.batch_size, len(train), cfg.seed)]
        inputs, labels = x[:, :-1], x[:, 1:].reshape(-1)
        with torch.no_grad():
            t_logits = teacher(inputs).logits
        s_logits = student(inputs).logits
        v = min(s_logits.shape[-1], t_logits.shape[-1])  # same tokenizer, vocab padding may differ
        loss, parts = kd_loss(
            s_logits[..., :v].reshape(len(labels), v), t_logits[..., :v].reshape(len(labels), v), labels,
            cfg.alpha, cfg.temperature,
        )
        del t_logits, s_logits
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        dt = time.perf_counter() - t0
        train_seconds += dt
        if step > start_step:  # the first step pays one-off allocation costs
            steady_tokens += inputs.numel()
            steady_seconds += dt
        loss_value = loss.item()
        history.append({"step": step + 1, "loss": loss_value, **parts, "grad_norm": float(grad_norm),
                        "lr": scheduler.get_last_lr()[0]})
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{inputs.numel() / dt:.0f}")
        bar.update(1)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(step + 1)
    bar.close()
    student.eval()
    after = evaluate(student, teacher, heldout)
    steps_done = cfg.steps
    return {
        "steps": steps_done,
        "tokens": steps_done * cfg.batch_size * seq_tokens,
        "seconds": round(train_seconds, 2),
        "tokens_per_s": (steady_tokens / steady_seconds) if steady_seconds else None,
        "alpha": cfg.alpha,
        "temperature": cfg.temperature,
        "before": before,
        "after": after,
        "teacher_ce": after["teacher_ce"],
        "history": history,
    }
