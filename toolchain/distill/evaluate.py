"""Held-out evaluation of a student against its teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate(student, teacher, blocks: torch.Tensor, batch_size: int = 4) -> dict:
    """Student CE, teacher CE, KL(teacher || student) at T=1 and top-1 agreement, token means."""
    student.eval()
    n_tok = 0
    sums = {"ce": 0.0, "teacher_ce": 0.0, "kl": 0.0, "agree": 0.0}
    for i in range(0, len(blocks), batch_size):
        x = blocks[i : i + batch_size]
        inputs, labels = x[:, :-1], x[:, 1:].reshape(-1)
        s = student(inputs).logits.float().reshape(len(labels), -1)
        t = teacher(inputs).logits.float().reshape(len(labels), -1)
        if t.shape[-1] != s.shape[-1]:
            v = min(t.shape[-1], s.shape[-1])
            s, t = s[:, :v], t[:, :v]
        s_logp, t_logp = F.log_softmax(s, -1), F.log_softmax(t, -1)
        sums["ce"] += float(F.nll_loss(s_logp, labels, reduction="sum"))
        sums["teacher_ce"] += float(F.nll_loss(t_logp, labels, reduction="sum"))
        sums["kl"] += float((t_logp.exp() * (t_logp - s_logp)).sum())
        sums["agree"] += float((s.argmax(-1) == t.argmax(-1)).sum())
        n_tok += len(labels)
    return {
        "ce": sums["ce"] / n_tok,
        "teacher_ce": sums["teacher_ce"] / n_tok,
        "kl": sums["kl"] / n_tok,
        "top1_agreement": sums["agree"] / n_tok,
        "tokens": n_tok,
    }
