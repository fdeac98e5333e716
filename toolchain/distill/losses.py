"""Distillation losses: standalone functions on [tokens, vocab] logits.

Softmaxes run in fp32 and means are token-weighted over positions that are not `ignore_index`,
so padding never dilutes the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _mask(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return (labels != ignore_index).float()


def forward_kl(student_logits, teacher_logits, labels, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX):
    """Token-mean KL(teacher_T || student_T) over unmasked positions."""
    t = temperature
    s_logp = F.log_softmax(student_logits.float() / t, dim=-1)
    t_logp = F.log_softmax(teacher_logits.float() / t, dim=-1)
    per_token = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    mask = _mask(labels, ignore_index)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def cross_entropy(student_logits, labels, ignore_index: int = IGNORE_INDEX):
    return F.cross_entropy(student_logits.float(), labels, ignore_index=ignore_index)


def kd_loss(student_logits, teacher_logits, labels, alpha: float, temperature: float,
            ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, dict]:
    """alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T) (Hinton et al.).

    The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones
    as T changes. Inputs are flattened [tokens, vocab] logits and [tokens] labels.
    """
    ce = cross_entropy(student_logits, labels, ignore_index)
    kl = forward_kl(student_logits, teacher_logits, labels, temperature, ignore_index)
    loss = alpha * ce + (1.0 - alpha) * temperature**2 * kl
    return loss, {"ce": float(ce.detach()), "kl_t": float(kl.detach())}
