"""`toolchain finetune`: fine-tune the teacher on the task's train split (LoRA, QLoRA or all weights).

Supervised fine-tuning with the loss on the answer tokens only: each example is rendered with the
teacher's chat template, the prompt tokens carry no loss. Rows are left-padded so every answer ends
at the last position, and the LM head runs only over the answer tail (`logits_to_keep`): with a
49k-262k vocabulary the head is most of a forward pass, and the prompt's logits are not needed.

The result is an HF directory, LoRA merged into the weights (QLoRA: merged into the full-precision
base, not the 4-bit one), that the rest of the pipeline takes as the teacher. A run checkpoints its
trainable weights and optimizer every `checkpoint_every` steps and resumes from them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from toolchain.config import FinetuneConfig, TeacherConfig
from toolchain.data.batch_order import batch_indices
from toolchain.data.chat_encoding import encode_example
from toolchain.data.tasks import TaskExample
from toolchain.errors import DivergenceError, UserError
from toolchain.fileio import atomic_path
from toolchain.formats import IGNORE_INDEX
from toolchain.models.load import LoadedModel, load_model, save_model
from toolchain.models.lora import attach_lora

log = logging.getLogger(__name__)

CHECKPOINT = "finetune-state.pt"


def encode_task(tokenizer, examples: list[TaskExample], seq_len: int) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) per example that fits in seq_len tokens; the others are left out."""
    out = [encode_example(tokenizer, e.messages) for e in examples]
    kept = [(ids, n) for ids, n in out if len(ids) <= seq_len and len(ids) > n]
    if not kept:
        shortest = min(len(ids) for ids, _ in out)
        raise UserError(
            f"every task example is longer than finetune.seq_len={seq_len} tokens (shortest: {shortest}); "
            "raise finetune.seq_len or shorten the prompts"
        )
    if len(kept) < len(out):
        log.warning(
            "%d of %d task examples left out: longer than finetune.seq_len=%d", len(out) - len(kept), len(out), seq_len
        )
    return kept


def collate(rows: list[tuple[list[int], int]], pad: int) -> dict[str, torch.Tensor]:
    """Left-padded inputs and the answer tail's labels: every row's answer ends at the last position."""
    width = max(len(ids) for ids, _ in rows) - 1
    tail = max(len(ids) - n for ids, n in rows)  # answer targets of the longest answer
    input_ids, mask, labels = [], [], []
    for ids, n in rows:
        inp, tgt = ids[:-1], ids[1:]
        n_pad = width - len(inp)
        input_ids.append([pad] * n_pad + inp)
        mask.append([0] * n_pad + [1] * len(inp))
        n_answer = len(ids) - n  # tgt[i] is an answer token when i + 1 >= n
        lab = tgt[-n_answer:]
        labels.append([IGNORE_INDEX] * (tail - n_answer) + lab)
    m = torch.tensor(mask)
    return {
        "input_ids": torch.tensor(input_ids),
        "attention_mask": m,
        "position_ids": (m.cumsum(-1) - 1).clamp_min(0),
        "labels": torch.tensor(labels),
    }


def answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens."""
    labels = batch["labels"]
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=labels.shape[1],
        use_cache=False,
    ).logits
    n = int((labels != IGNORE_INDEX).sum())
    loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss / max(n, 1)


# ---------------------------------------------------------------------------- model set-up


def load_for_finetune(teacher: TeacherConfig, cfg: FinetuneConfig) -> LoadedModel:
    """The teacher ready to train: LoRA on an fp32 base, LoRA on a 4-bit base (QLoRA), or all weights."""
    if cfg.method == "qlora":
        if teacher.adapter:
            raise UserError("finetune.method qlora: merge teacher.adapter into the teacher first (method lora does)")
        loaded = load_model(teacher.model, quantize="4bit")
    else:
        loaded = load_model(teacher.model, teacher.adapter, teacher.dtype)
    if cfg.method != "full":
        torch.manual_seed(cfg.seed)  # the adapters' initial weights: the same run gives the same model
        loaded.model = attach_lora(loaded.model, cfg.lora, "finetune.lora")
    loaded.model.train()
    return loaded


def _settings_key(teacher: TeacherConfig, cfg: FinetuneConfig, rows: list[tuple[list[int], int]]) -> str:
    h = hashlib.sha256(json.dumps([asdict(teacher), asdict(cfg)], sort_keys=True).encode())
    h.update(json.dumps(rows).encode())
    return h.hexdigest()[:16]


def _schedule(optimizer, cfg: FinetuneConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        done = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))  # cosine to 10%

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------- the loop


def _save_state(path: Path, model, optimizer, scheduler, step: int, key: str, losses: list[float]) -> None:
    trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    state = {"step": step, "key": key, "trainable": trainable, "losses": losses}
    state.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict())
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _resume(path: Path, model, optimizer, scheduler, key: str) -> tuple[int, list[float]]:
    if not path.is_file():
        return 0, []
    state = torch.load(path, weights_only=False)
    if state.get("key") != key:
        log.warning("ignoring %s: it was made with other settings or data", path)
        return 0, []
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    log.info("resuming fine-tuning at step %d", state["step"])
    return int(state["step"]), list(state["losses"])


def train(loaded: LoadedModel, rows, cfg: FinetuneConfig, work_dir: Path, key: str, echo=print) -> list[float]:
    """The SFT loop; returns the loss of every step (resumed steps included)."""
    model, tok = loaded.model, loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    scheduler = _schedule(optimizer, cfg)
    ckpt = work_dir / CHECKPOINT
    start, losses = _resume(ckpt, model, optimizer, scheduler, key)
    t0, tokens = time.perf_counter(), 0
    for step in range(start, cfg.steps):
        idx = batch_indices(step, cfg.batch_size, len(rows), cfg.seed).tolist()
        batch = collate([rows[i] for i in idx], pad)
        loss = answer_loss(model, batch)
        if not torch.isfinite(loss):
            raise DivergenceError(
                f"fine-tuning diverged at step {step}: loss {float(loss)} (last finite {losses[-1:]}); "
                f"lower finetune.lr (now {cfg.lr})"
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        tokens += int(batch["attention_mask"].sum())
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            _save_state(ckpt, model, optimizer, scheduler, step + 1, key, losses)
        if (step + 1) % 10 == 0 or step + 1 == cfg.steps:
            rate = tokens / max(time.perf_counter() - t0, 1e-9)
            echo(f"  finetune step {step + 1}/{cfg.steps}: answer loss {losses[-1]:.3f} ({rate:.0f} tok/s)")
    return losses


def finetune_teacher(
    teacher: TeacherConfig,
    examples: list[TaskExample],
    out_dir: str | os.PathLike,
    cfg: FinetuneConfig,
    work_dir: str | os.PathLike | None = None,
    echo=print,
) -> dict:
    """Fine-tune `teacher` on `examples` into `out_dir` (HF directory, LoRA merged); resumable."""
    out_dir = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else out_dir.with_name(out_dir.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    loaded = load_for_finetune(teacher, cfg)
    rows = encode_task(loaded.tokenizer, examples, cfg.seq_len)
    key = _settings_key(teacher, cfg, rows)
    losses = train(loaded, rows, cfg, work, key, echo)
    merged = _merged(loaded, teacher, cfg, work)
    meta = {
        **loaded.meta,
        "name": f"{loaded.meta.get('name', 'teacher')}-finetuned",
        "finetuned": {"method": cfg.method, "steps": cfg.steps, "examples": len(rows), "data_sha256": key},
    }
    meta.pop("variant", None)
    save_model(merged, loaded.tokenizer, out_dir, meta)
    first, last = sum(losses[:10]) / len(losses[:10]), sum(losses[-10:]) / len(losses[-10:])
    return {
        "path": str(out_dir),
        "method": cfg.method,
        "steps": cfg.steps,
        "examples": len(rows),
        "loss_first10": round(first, 4),
        "loss_last10": round(last, 4),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _merged(loaded: LoadedModel, teacher: TeacherConfig, cfg: FinetuneConfig, work: Path):
    """The fine-tuned model as plain weights: LoRA merged (QLoRA: into the unquantized base)."""
    model = loaded.model
    if cfg.method == "full":
        return model.eval()
    if cfg.keep_adapter or cfg.method == "qlora":
        model.save_pretrained(work / "adapter")
    if cfg.method == "lora":
        return model.merge_and_unload().eval()
    from toolchain.models.load import merge_adapter

    base = load_model(teacher.model, dtype=teacher.dtype).model
    return merge_adapter(base, work / "adapter").eval()
