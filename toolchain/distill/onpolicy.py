"""On-policy distillation (GKD's lambda, Agarwal et al. 2024): on a fraction of micro-batches the
student continues a prompt with its own samples, and the loss is taken on those tokens against
the online teacher, so the student learns from the states it actually reaches.

Where the prompt ends depends on the rows: chat examples (task data, prompt/response pairs) carry
no labels on their prompt, so the student answers each prompt from where its answer starts, as it
will when deployed; plain text blocks (every token labelled) keep a fixed-length prefix.

Which micro-batches are on-policy, and what is sampled, are fixed by (seed, micro-step): a
resumed run samples exactly what the uninterrupted run did, without carrying RNG state.
"""

from __future__ import annotations

import torch

from toolchain.config import DistillConfig
from toolchain.distill.batch import IGNORE_INDEX, Batch
from toolchain.errors import UserError

_SALT = 0x5EED_0F_0B  # separates these seeds from the data-order seeds


def _seed(cfg: DistillConfig, micro_step: int) -> int:
    return (cfg.seed * 1_000_003 + micro_step) ^ _SALT


def is_on_policy(cfg: DistillConfig, micro_step: int) -> bool:
    if cfg.on_policy_fraction <= 0.0:
        return False
    g = torch.Generator().manual_seed(_seed(cfg, micro_step))
    return float(torch.rand((), generator=g)) < cfg.on_policy_fraction


@torch.no_grad()
def on_policy_batch(
    student, batch: Batch, cfg: DistillConfig, micro_step: int, eos_ids: list[int] | None = None
) -> Batch:
    """The batch with the student's own continuations: of each chat row's prompt (an answer of
    up to the longest answer's length in the batch), or of the first `on_policy_prompt_tokens`
    tokens of each text row (to the row's length). Labels only on the sampled tokens, up to and
    including an end-of-sequence."""
    if batch.teacher_topk_ids is not None:
        raise UserError(
            "on-policy distillation needs the online teacher to score the student's samples; "
            "it cannot train from an offline teacher cache (set distill.on_policy_fraction=0, "
            "or train with the teacher loaded)"
        )
    learned = batch.labels != IGNORE_INDEX
    if not bool(learned[:, 0].all()):
        return _answer_batch(student, batch, cfg, micro_step, eos_ids or [], learned)
    length = batch.input_ids.shape[1] + 1
    prompt = min(cfg.on_policy_prompt_tokens, length - 1)
    if batch.attention_mask is not None and not bool(batch.attention_mask[:, :prompt].all()):
        raise UserError(
            f"on-policy prompts need {prompt} real tokens per row; shorten "
            "distill.on_policy_prompt_tokens or use longer sequences"
        )
    prefix = batch.input_ids[:, :prompt]
    dev = prefix.device
    out = _sample(student, prefix, torch.ones_like(prefix), length - prompt, cfg, micro_step, eos_ids or [])
    if out.shape[1] < length:  # every row ended early: pad (masked below, being past an end token)
        out = torch.cat([out, out.new_full((len(out), length - out.shape[1]), eos_ids[0] if eos_ids else 0)], 1)
    full = out[:, :length]
    labels = full[:, 1:].clone()
    labels[:, : prompt - 1] = IGNORE_INDEX  # the prompt is given, not learned
    attn = torch.ones_like(full[:, :-1])
    if eos_ids:
        # after the first sampled end-of-sequence nothing is real text: right padding
        gen = full[:, prompt:]
        hit = torch.isin(gen, torch.tensor(eos_ids, device=dev))
        first = torch.where(hit.any(1), hit.float().argmax(1), torch.full((len(gen),), gen.shape[1], device=dev))
        pos = torch.arange(full.shape[1] - 1, device=dev).unsqueeze(0)
        after = pos > (prompt + first).unsqueeze(1) - 1  # input positions past the EOS token
        labels[after] = IGNORE_INDEX
        attn[after] = 0
    return Batch(input_ids=full[:, :-1], labels=labels, attention_mask=attn)


def _sample(student, ids, mask, max_new: int, cfg: DistillConfig, micro_step: int, eos_ids: list[int]):
    """The student's sampled continuation of `ids` (prompt included), seeded by (seed, micro-step)."""
    was_training = student.training
    student.eval()
    # the sampling seed is set here and the callers' RNG streams are left as they were (on a GPU
    # the sampling draws from that device's generator)
    dev = ids.device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(_seed(cfg, micro_step))
        out = student.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=cfg.on_policy_temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new,
            pad_token_id=eos_ids[0] if eos_ids else 0,
            eos_token_id=eos_ids or None,
            use_cache=True,
        )
    student.train(was_training)
    return out


def _answer_batch(student, batch: Batch, cfg: DistillConfig, micro_step: int, eos_ids: list[int], learned) -> Batch:
    """Each row's prompt (the tokens before its first label) answered by the student."""
    rows = len(batch.input_ids)
    mask_in = batch.attention_mask if batch.attention_mask is not None else torch.ones_like(learned)
    real = mask_in.sum(1)
    # a row's prompt is its tokens up to the one whose label is the first answer token
    prompt_len = torch.where(learned.any(1), learned.float().argmax(1) + 1, real).tolist()
    budget = max(int(learned.sum(1).max()), 1)
    pad = eos_ids[0] if eos_ids else 0
    width = max(prompt_len)
    ids = batch.input_ids.new_full((rows, width), pad)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(prompt_len):  # left padding, so every prompt ends where sampling starts
        ids[r, width - n :] = batch.input_ids[r, :n]
        mask[r, width - n :] = 1
    gen = _sample(student, ids, mask, budget, cfg, micro_step, eos_ids)[:, width:].tolist()
    seqs = []
    for r, n in enumerate(prompt_len):
        answer = gen[r]
        ends = [i for i, t in enumerate(answer) if t in eos_ids]
        answer = answer[: ends[0] + 1] if ends else answer  # nothing after the end token is real
        seqs.append(batch.input_ids[r, :n].tolist() + answer)
    length = max(len(q) for q in seqs)
    full = batch.input_ids.new_full((rows, length), pad)
    labels = batch.labels.new_full((rows, length - 1), IGNORE_INDEX)
    attn = torch.zeros_like(labels)
    for r, (q, n) in enumerate(zip(seqs, prompt_len)):
        full[r, : len(q)] = torch.tensor(q, device=full.device)
        labels[r, n - 1 : len(q) - 1] = full[r, n : len(q)]  # the sampled answer, predicted from the prompt on
        attn[r, : len(q) - 1] = 1
    return Batch(input_ids=full[:, :-1], labels=labels, attention_mask=attn)


def eos_token_ids(model) -> list[int]:
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
