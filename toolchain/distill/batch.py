"""What the training loop consumes: one `Batch` per optimizer micro-step.

Every data mode (packed text with an online teacher, an offline top-k teacher cache,
sequence-level KD on generations or on a user's prompt/response JSONL, on-policy student
continuations) produces these, so the loop and the losses never branch on where data came from.

Conventions:
- `labels[b, i]` is the target for the token *after* `input_ids[b, i]` (already shifted), or
  IGNORE_INDEX where no loss applies (prompt tokens in sequence-level KD, padding).
- Padding is on the right and marked by `attention_mask == 0`.
- When `teacher_topk_ids` is set, the teacher is not run: its distribution at each position
  is the stored top-k log-probabilities (at T=1, normalised over the full vocabulary) plus the
  remaining tail mass 1 - sum(exp(topk)), which the sparse losses treat as one bucket.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toolchain.formats import IGNORE_INDEX


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L] long
    labels: torch.Tensor  # [B, L] long, shifted targets, IGNORE_INDEX where no loss
    attention_mask: torch.Tensor | None = None  # [B, L], 1 = real token; None = no padding
    teacher_topk_ids: torch.Tensor | None = None  # [B, L, k] long (offline cache)
    teacher_topk_logprobs: torch.Tensor | None = None  # [B, L, k] float, log p_teacher (T=1)

    @property
    def n_loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device: torch.device) -> Batch:
        """This batch on `device` (itself when it is there already: CPU runs copy nothing)."""
        if self.input_ids.device == device:
            return self
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        return Batch(
            self.input_ids.to(device, non_blocking=True),
            self.labels.to(device, non_blocking=True),
            move(self.attention_mask),
            move(self.teacher_topk_ids),
            move(self.teacher_topk_logprobs),
        )

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor) -> Batch:
        """Packed text blocks [B, L+1] -> inputs [B, L] and next-token labels [B, L]."""
        return cls(input_ids=blocks[:, :-1], labels=blocks[:, 1:].clone())
