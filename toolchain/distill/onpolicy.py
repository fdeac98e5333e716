"""On-policy distillation (GKD's lambda, Agarwal et al. 2024): on a fraction of micro-batches the
student continues a prompt prefix with its own samples, and the loss is taken on those tokens
against the online teacher, so the student learns from the states it actually reaches.

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
    """The first `on_policy_prompt_tokens` tokens of each row, continued by the student to the
    row's length; labels only on the sampled tokens (and none after an end-of-sequence)."""
    if batch.teacher_topk_ids is not None:
        raise UserError(
            "on-policy distillation needs the online teacher to score the student's samples; "
            "it cannot train from an offline teacher cache (set distill.on_policy_fraction=0, "
            "or train with the teacher loaded)"
        )
    length = batch.input_ids.shape[1] + 1
    prompt = min(cfg.on_policy_prompt_tokens, length - 1)
    if batch.attention_mask is not None and not bool(batch.attention_mask[:, :prompt].all()):
        raise UserError(
            f"on-policy prompts need {prompt} real tokens per row; shorten "
            "distill.on_policy_prompt_tokens or use longer sequences"
        )
    prefix = batch.input_ids[:, :prompt]
    was_training = student.training
    student.eval()
    # the sampling seed is set here and the callers' RNG streams are left as they were (on a GPU
    # the sampling draws from that device's generator)
    dev = prefix.device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(_seed(cfg, micro_step))
        out = student.generate(
            input_ids=prefix,
            attention_mask=torch.ones_like(prefix),
            do_sample=True,
            temperature=cfg.on_policy_temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=length - prompt,
            pad_token_id=eos_ids[0] if eos_ids else 0,
            eos_token_id=eos_ids or None,
            use_cache=True,
        )
    student.train(was_training)
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


def eos_token_ids(model) -> list[int]:
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
