"""The distillation training loop, written out (no framework Trainer).

Data comes from `batch_fn(micro_step) -> Batch` (toolchain/distill/batch.py): a deterministic
function of the micro-step index, so the data position is just the step counter. The teacher
runs only for batches that carry no stored top-k targets (offline cache), and may be None when
none needs it.

Resumable: every `checkpoint_every` steps the student, optimizer, scheduler, RNG states and
the step counter are written atomically to `work_dir/checkpoint.pt`; a rerun continues there.

Under `accelerate launch` / `torchrun` the step's micro-batches are shared out over the
processes (toolchain/devices/parallel.py); process 0 evaluates and writes checkpoints.
Training runs on `distill.device` (toolchain/devices/placement.py): the models are moved there
for the run, batches as they are used; the student is handed back where it came from.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from toolchain.config import DistillConfig
from toolchain.data.batch_order import batch_indices
from toolchain.devices.parallel import (
    Parallel,
    all_sum,
    barrier,
    broadcast_parameters,
    from_env,
    micro_batch_index,
    sum_gradients,
)
from toolchain.devices.placement import model_device, place, resolve_device
from toolchain.distill.batch import IGNORE_INDEX, Batch
from toolchain.distill.guard import DivergenceGuard, resolve_eval_every
from toolchain.distill.head import final_hidden, plain_output_weight
from toolchain.distill.head_loss import fused_head_loss
from toolchain.distill.hidden import HiddenMatcher
from toolchain.distill.losses import LossSpec, SparseTeacher, chunked_loss
from toolchain.distill.onpolicy import eos_token_ids
from toolchain.distill.session import BatchFn, RunSetup, Session, Throughput
from toolchain.distill.state import CHECKPOINT, TrainState, load_checkpoint, nonfinite_message, save_checkpoint
from toolchain.distill.tuning import keep_freed_memory
from toolchain.errors import UserError

log = logging.getLogger(__name__)


def lr_lambda(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def packed_batches(blocks: torch.Tensor, batch_size: int, seed: int) -> BatchFn:
    """batch_fn over packed text blocks [n, L+1]: micro-step m gets a seeded shuffle's m-th slice."""
    if len(blocks) < batch_size:
        raise UserError(
            f"only {len(blocks)} training blocks for distill.batch_size={batch_size}; use more text or a smaller batch"
        )
    return lambda m: Batch.from_blocks(blocks[batch_indices(m, batch_size, len(blocks), seed)])


def loss_spec(cfg: DistillConfig) -> LossSpec:
    return LossSpec(kind=cfg.loss, alpha=cfg.alpha, temperature=cfg.temperature, beta=cfg.beta, skew=cfg.skew)


def teacher_target(teacher, batch: Batch, spec: LossSpec):
    """What the loss compares against: stored top-k (teacher not run) or online teacher logits;
    None when the loss is hard-label CE only (alpha = 1: plain fine-tuning, no teacher run)."""
    if spec.alpha == 1.0:
        return None
    if batch.teacher_topk_ids is not None:
        ids, lp = batch.teacher_topk_ids, batch.teacher_topk_logprobs
        assert lp is not None  # stored together with teacher_topk_ids
        return SparseTeacher(ids.reshape(-1, ids.shape[-1]), lp.reshape(-1, lp.shape[-1]))
    if teacher is None:
        raise UserError(
            "this batch has no stored teacher top-k targets, so the teacher model is needed; "
            "pass a teacher (or train from a complete teacher cache)"
        )
    with torch.inference_mode():
        logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return logits.reshape(-1, logits.shape[-1]).clone()  # clone: leave inference mode for autograd's sake


def _scored_rows(s_h: torch.Tensor, target, labels: torch.Tensor):
    """Only the positions that carry a loss (answer tokens of chat sequences; all of packed text).

    A task example is mostly prompt: its answer may be 2 tokens of 120. The output layer is a
    vocabulary-sized matmul per position, so it runs only where a label is; the other positions
    add nothing to the loss or its gradient either way.
    """
    keep = labels != IGNORE_INDEX
    if bool(keep.all()):
        return s_h, target, labels
    if isinstance(target, tuple):  # the online teacher's (final hidden states, head weight)
        target = (target[0][keep], target[1])
    elif target is not None:  # a SparseTeacher
        target = target[keep]
    return s_h[keep], target, labels[keep]


def batch_loss(student, teacher, batch: Batch, spec: LossSpec, denom: float, hidden=None, hidden_weight: float = 1.0):
    """Token-weighted loss of one micro-batch, divided by `denom` (the step's loss tokens).

    When both models end in a plain linear head, the fused path makes logits chunk by chunk from
    final hidden states (the whole batch's [tokens, vocab] logits never exist); else full logits.
    `hidden`: a HiddenMatcher adding hidden_weight * its layer-matching term.
    """
    labels = batch.labels.reshape(-1)
    s_w = plain_output_weight(student)
    needs_online = (spec.alpha < 1.0 and batch.teacher_topk_ids is None) or hidden is not None
    if hidden is not None and teacher is None:
        raise UserError(
            "distill.hidden_loss needs the teacher's hidden states, so the teacher must be loaded "
            "(an offline cache holds only its top-k logits)"
        )
    t_w = plain_output_weight(teacher) if needs_online and teacher is not None else None
    want = hidden is not None
    t_states = s_states = None
    if s_w is not None and (not needs_online or t_w is not None):
        target = None
        if needs_online:
            with torch.inference_mode():
                t_out = final_hidden(teacher, batch, want)
            t_h, t_states = t_out if want else (t_out, None)
            if spec.alpha < 1.0 and batch.teacher_topk_ids is None:
                target = (t_h.clone(), t_w)  # clone: a normal tensor, usable next to autograd
        if target is None:
            target = teacher_target(teacher, batch, spec)
        s_out = final_hidden(student, batch, want)
        s_h, s_states = s_out if want else (s_out, None)
        s_h, target, kept = _scored_rows(s_h, target, labels)
        loss, ce, div = fused_head_loss(s_h, s_w, target, kept, spec, denom=denom)
    else:
        target = teacher_target(teacher, batch, spec)
        out = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=want)
        s_logits, s_states = out.logits, out.hidden_states
        loss, ce, div = chunked_loss(s_logits.reshape(len(labels), -1), target, labels, spec, denom=denom)
        if want:
            with torch.inference_mode():
                t_states = teacher(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True
                ).hidden_states
    if hidden is not None:
        assert t_states is not None  # hidden implies want: the teacher ran with its hidden states
        t_states = tuple(t.clone() for t in t_states)
        loss = loss + hidden_weight * hidden(s_states, t_states, batch.labels != IGNORE_INDEX, denom)
    return loss, ce, div


def _compile_decoders(*models) -> None:
    """torch.compile each model's decoder body in place (parameter names, and so checkpoints and
    the saved student, stay as they are). The fused head's chunked loss stays eager: it is
    matmuls plus a few passes that are already written to touch each element twice."""
    for model in models:
        if model is None:
            continue
        try:
            body = model.get_decoder()
        except (AttributeError, NotImplementedError):
            body = model
        body.compile()


def _n_tokens(batch: Batch) -> int:
    return int(batch.attention_mask.sum()) if batch.attention_mask is not None else batch.input_ids.numel()


def check_requirements(teacher, cfg: DistillConfig) -> None:
    """Everything the run needs that can be checked before any step or evaluation is spent."""
    if cfg.hidden_loss != "none" and teacher is None:
        raise UserError("distill.hidden_loss needs the teacher loaded (an offline cache holds only top-k logits)")
    if cfg.on_policy_fraction > 0 and teacher is None:
        raise UserError(
            "distill.on_policy_fraction > 0 needs the online teacher to score the student's samples; "
            "it cannot run from an offline teacher cache alone"
        )


def _setup(teacher, student, cfg: DistillConfig, layer_map) -> RunSetup:
    keep_freed_memory()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    device = resolve_device(cfg.device)
    home = model_device(student)
    place(student, device)
    place(teacher, device)
    if cfg.compile:
        # the teacher only where training runs it (with alpha = 1 it only evaluates)
        _compile_decoders(student, teacher if cfg.alpha < 1.0 or cfg.hidden_loss != "none" else None)
    hidden = None
    if cfg.hidden_loss != "none":
        hidden = HiddenMatcher(
            layer_map or [],
            student.config.get_text_config().hidden_size,
            teacher.config.get_text_config().hidden_size,
            cfg.hidden_loss,
        ).to(device)
    params = [p for p in student.parameters() if p.requires_grad]
    if hidden is not None:
        params += list(hidden.parameters())  # the projection trains with the student
    # fused AdamW updates each tensor in one pass, without the foreach path's parameter-sized
    # temporaries (~4 bytes x params per step): less memory traffic and a lower peak RSS
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, cfg.warmup_steps, cfg.steps))
    # bf16 autocast runs the matmuls in bf16 (AVX-512 BF16 / AMX CPUs, CUDA); losses stay fp32
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    return RunSetup(device, home, loss_spec(cfg), hidden, params, optimizer, scheduler, autocast)


def _train_step(student, teacher, batches: list[Batch], run: RunSetup, cfg: DistillConfig, par: Parallel) -> dict:
    """One optimizer step over the step's micro-batches; the step's figures (not yet applied
    when the loss or gradient norm is not finite: the caller stops)."""
    # token-weighted over the whole step (all processes): each micro-batch is divided by the
    # step's loss tokens
    denom = max(1, all_sum(par, sum(b.n_loss_tokens for b in batches)))
    run.optimizer.zero_grad(set_to_none=True)
    loss_value, ce_value, div_value = 0.0, 0.0, 0.0
    for b in batches:
        with run.autocast:
            loss, ce, div = batch_loss(student, teacher, b, run.spec, denom, run.hidden, cfg.hidden_weight)
        loss.backward()
        loss_value += loss.item()
        ce_value += float(ce)
        div_value += float(div)
    if par.active:
        sum_gradients(par, run.params)
        loss_value, ce_value, div_value = (all_sum(par, v) for v in (loss_value, ce_value, div_value))
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip))
    figures = {"loss": loss_value, "ce": ce_value, "kl_t": div_value, "grad_norm": grad_norm}
    if math.isfinite(loss_value) and math.isfinite(grad_norm):
        run.optimizer.step()
        run.scheduler.step()
    return figures


def _start_session(
    teacher,
    student,
    batch_fn: BatchFn,
    heldout,
    cfg: DistillConfig,
    work_dir: Path,
    run: RunSetup,
    par: Parallel,
    progress: bool,
) -> Session:
    """The loop's shared parts, its state fresh or resumed from the checkpoint in work_dir."""
    ckpt_path = work_dir / CHECKPOINT
    guard = DivergenceGuard(cfg.divergence_ratio)
    eval_every = resolve_eval_every(cfg.eval_every, cfg.steps)
    state = TrainState()
    if ckpt_path.is_file():
        state = load_checkpoint(ckpt_path, student, run.optimizer, run.scheduler, run.hidden, guard, par)
        log.info("resuming distillation from step %d (%s)", state.step, ckpt_path)
    eval_sets = heldout if isinstance(heldout, dict) else {"heldout": heldout}
    # the same weights everywhere (the processes stay equal: they apply the same summed gradients)
    broadcast_parameters(par, student)
    if run.hidden is not None:
        broadcast_parameters(par, run.hidden)
    eos = eos_token_ids(student)
    bar = tqdm(total=cfg.steps, initial=state.step, desc="distill", disable=not (progress and par.main), unit="step")
    return Session(teacher, student, batch_fn, eval_sets, cfg, par, run, ckpt_path, guard, eval_every, state, eos, bar)


def _train_steps(session: Session) -> Throughput:
    """The steps from the state's step to cfg.steps, with their evaluations and checkpoints."""
    cfg, par, state = session.cfg, session.par, session.state
    session.student.train()
    start_step, steady = state.step, Throughput()
    for step in range(start_step, cfg.steps):
        t0 = time.perf_counter()
        batches = [session.next_batch(micro_batch_index(par, step, cfg.grad_accum, k)) for k in range(cfg.grad_accum)]
        fig = _train_step(session.student, session.teacher, batches, session.run, cfg, par)
        if not (math.isfinite(fig["loss"]) and math.isfinite(fig["grad_norm"])):
            session.bar.close()
            raise UserError(nonfinite_message(fig["loss"], fig["grad_norm"], step + 1, session.ckpt_path, cfg))
        dt = time.perf_counter() - t0
        step_tokens = int(all_sum(par, sum(_n_tokens(b) for b in batches)))
        state.step, state.train_seconds, state.tokens = step + 1, state.train_seconds + dt, state.tokens + step_tokens
        if step > start_step:  # the first step pays one-off allocation costs
            steady.tokens += step_tokens
            steady.seconds += dt
        state.history.append({"step": step + 1, **fig, "lr": session.run.scheduler.get_last_lr()[0], "seconds": dt})
        session.bar.set_postfix(loss=f"{fig['loss']:.3f}", tok_s=f"{step_tokens / dt:.0f}")
        session.bar.update(1)
        _evaluate_and_checkpoint(session, step + 1)
    return steady


def _evaluate_and_checkpoint(session: Session, done: int) -> None:
    """After `done` steps: the periodic evaluation (not after the last step: the final one
    follows), then the periodic or final checkpoint."""
    cfg, state = session.cfg, session.state
    if session.eval_every and done % session.eval_every == 0 and done < cfg.steps:
        state.history[-1]["eval"] = session.evaluate_all()
        session.student.train()
        log.info("step %d held-out %s", done, state.history[-1]["eval"])
        session.stop_if_diverged(done, state.history[-1]["eval"])
    if done % cfg.checkpoint_every == 0 or done == cfg.steps:
        run, student = session.run, session.student
        save_checkpoint(
            session.ckpt_path, state, student, run.optimizer, run.scheduler, run.hidden, session.guard, session.par
        )


def _figures(session: Session, after: dict | None, steady: Throughput) -> dict:
    """The report's figures (on processes other than 0: the counts only)."""
    cfg, state, primary = session.cfg, session.state, session.primary
    if not session.par.main:
        return {"steps": cfg.steps, "tokens": state.tokens, "rank": session.par.rank}
    before = state.before
    assert before is not None and after is not None  # process 0 evaluates (before: here or in the checkpoint)
    return {
        "steps": cfg.steps,
        "tokens": state.tokens,
        "seconds": round(state.train_seconds, 2),
        "tokens_per_s": (steady.tokens / steady.seconds) if steady.seconds else None,
        "loss": cfg.loss,
        "alpha": cfg.alpha,
        "temperature": cfg.temperature,
        "before": before[primary],
        "after": after[primary],
        "teacher_ce": after[primary].get("teacher_ce"),
        "eval_sets": {name: {"before": before[name], "after": after[name]} for name in session.eval_sets},
        "history": state.history,
        # the saved student is the last step's; `best` says where held-out KL was lowest
        "best": session.guard.best,
        "last_step": cfg.steps,
    }


def distill(
    teacher,
    student,
    batch_fn: BatchFn,
    heldout,
    cfg: DistillConfig,
    work_dir: str | os.PathLike,
    progress: bool = True,
    layer_map: list[tuple[int, int]] | None = None,
    par: Parallel | None = None,
) -> dict:
    """Train `student` towards `teacher` on `batch_fn`'s batches; returns figures for the report.

    batch_fn(m) gives micro-batch m (step s uses m = s * grad_accum ... + grad_accum - 1; with W
    processes, s * grad_accum * W ... and each process its share).
    heldout: packed blocks [n, L+1], a list of Batch, or {name: either} for several eval sets
    (the first is "the" held-out set of before/after; see `evaluate`).
    teacher may be None when every batch carries stored top-k targets.
    par: the process group (default: from the launcher's environment, else a single process).
    On processes other than 0 the returned figures hold no evaluations.
    """
    check_requirements(teacher, cfg)
    par = par or from_env()
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    run = _setup(teacher, student, cfg, layer_map)
    session = _start_session(teacher, student, batch_fn, heldout, cfg, work_dir, run, par, progress)
    if session.state.before is None:
        session.state.before = session.evaluate_all()
        session.stop_if_diverged(0, session.state.before)
    steady = _train_steps(session)
    session.bar.close()
    student.eval()
    after = session.evaluate_all()
    session.stop_if_diverged(cfg.steps, after)
    place(student, run.home)
    barrier(par)
    return _figures(session, after, steady)
