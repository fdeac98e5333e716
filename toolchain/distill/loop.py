"""The distillation training loop, written out (no framework Trainer).

Data comes from `batch_fn(micro_step) -> Batch` (toolchain/distill/batch.py): a deterministic
function of the micro-step index, so the data position is just the step counter. The teacher
runs only for batches that carry no stored top-k targets (offline cache), and may be None when
none needs it.

Resumable: every `checkpoint_every` steps the student, optimizer, scheduler, RNG states and
the step counter are written atomically to `work_dir/checkpoint.pt`; a rerun continues there.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from toolchain.config import DistillConfig
from toolchain.distill.batch import IGNORE_INDEX, Batch
from toolchain.distill.evaluate import evaluate
from toolchain.distill.losses import LossSpec, SparseTeacher, chunked_loss
from toolchain.errors import UserError
from toolchain.fileio import atomic_path

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
BatchFn = Callable[[int], Batch]


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


def packed_batches(blocks: torch.Tensor, batch_size: int, seed: int) -> BatchFn:
    """batch_fn over packed text blocks [n, L+1]: micro-step m gets a seeded shuffle's m-th slice."""
    if len(blocks) < batch_size:
        raise UserError(f"only {len(blocks)} training blocks for distill.batch_size={batch_size}; "
                        "use more text or a smaller batch")
    return lambda m: Batch.from_blocks(blocks[_batch_indices(m, batch_size, len(blocks), seed)])


def check_same_vocabulary(teacher_tok, student_tok) -> None:
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise UserError(
            "teacher and student tokenizers differ; logit distillation needs a shared tokenizer "
            "(make the student from the teacher with `toolchain student`)"
        )


def loss_spec(cfg: DistillConfig) -> LossSpec:
    return LossSpec(kind=cfg.loss, alpha=cfg.alpha, temperature=cfg.temperature, beta=cfg.beta, skew=cfg.skew)


def teacher_target(teacher, batch: Batch):
    """What the loss compares against: stored top-k (teacher not run) or online teacher logits."""
    if batch.teacher_topk_ids is not None:
        ids, lp = batch.teacher_topk_ids, batch.teacher_topk_logprobs
        return SparseTeacher(ids.reshape(-1, ids.shape[-1]), lp.reshape(-1, lp.shape[-1]))
    if teacher is None:
        raise UserError("this batch has no stored teacher top-k targets, so the teacher model is needed; "
                        "pass a teacher (or train from a complete teacher cache)")
    with torch.inference_mode():
        logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return logits.reshape(-1, logits.shape[-1]).clone()  # clone: leave inference mode for autograd's sake


def batch_loss(student, teacher, batch: Batch, spec: LossSpec, denom: float):
    """Token-weighted loss of one micro-batch, divided by `denom` (the step's loss tokens)."""
    target = teacher_target(teacher, batch)
    s_logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    labels = batch.labels.reshape(-1)
    return chunked_loss(s_logits.reshape(len(labels), -1), target, labels, spec, denom=denom)


def _n_tokens(batch: Batch) -> int:
    return int(batch.attention_mask.sum()) if batch.attention_mask is not None else batch.input_ids.numel()


def distill(teacher, student, batch_fn: BatchFn, heldout, cfg: DistillConfig,
            work_dir: str | os.PathLike, progress: bool = True) -> dict:
    """Train `student` towards `teacher` on `batch_fn`'s batches; returns figures for the report.

    batch_fn(m) gives micro-batch m (step s uses m = s * grad_accum ... + grad_accum - 1).
    heldout: packed blocks [n, L+1] or a list of Batch (see `evaluate`).
    teacher may be None when every batch carries stored top-k targets.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    keep_freed_memory()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    spec = loss_spec(cfg)
    accum = cfg.grad_accum

    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, cfg.warmup_steps, cfg.steps))

    ckpt_path = work_dir / CHECKPOINT
    start_step, history, before, train_seconds, tokens = 0, [], None, 0.0, 0
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        student.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        start_step, history, before = ckpt["step"], ckpt["history"], ckpt["before"]
        train_seconds, tokens = ckpt.get("train_seconds", 0.0), ckpt.get("tokens", 0)
        log.info("resuming distillation from step %d (%s)", start_step, ckpt_path)
    if before is None:
        before = evaluate(student, teacher, heldout)

    def save_checkpoint(step: int) -> None:
        with atomic_path(ckpt_path) as tmp:
            torch.save(
                {"model": student.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": torch.get_rng_state(), "step": step, "history": history, "before": before,
                 "train_seconds": train_seconds, "tokens": tokens},
                tmp,
            )

    bar = tqdm(total=cfg.steps, initial=start_step, desc="distill", disable=not progress, unit="step")
    student.train()
    steady_tokens, steady_seconds = 0, 0.0
    for step in range(start_step, cfg.steps):
        t0 = time.perf_counter()
        batches = [batch_fn(step * accum + k) for k in range(accum)]
        # token-weighted over the whole step: each micro-batch is divided by the step's loss tokens
        denom = max(1, sum(b.n_loss_tokens for b in batches))
        optimizer.zero_grad(set_to_none=True)
        loss_value, ce_value, div_value = 0.0, 0.0, 0.0
        for b in batches:
            loss, ce, div = batch_loss(student, teacher, b, spec, denom)
            loss.backward()
            loss_value += loss.item()
            ce_value += float(ce)
            div_value += float(div)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        dt = time.perf_counter() - t0
        step_tokens = sum(_n_tokens(b) for b in batches)
        train_seconds += dt
        tokens += step_tokens
        if step > start_step:  # the first step pays one-off allocation costs
            steady_tokens += step_tokens
            steady_seconds += dt
        history.append({"step": step + 1, "loss": loss_value, "ce": ce_value, "kl_t": div_value,
                        "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0]})
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{step_tokens / dt:.0f}")
        bar.update(1)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(step + 1)
    bar.close()
    student.eval()
    after = evaluate(student, teacher, heldout)
    return {
        "steps": cfg.steps,
        "tokens": tokens,
        "seconds": round(train_seconds, 2),
        "tokens_per_s": (steady_tokens / steady_seconds) if steady_seconds else None,
        "loss": cfg.loss,
        "alpha": cfg.alpha,
        "temperature": cfg.temperature,
        "before": before,
        "after": after,
        "teacher_ce": after.get("teacher_ce"),
        "history": history,
    }
