"""Held-out evaluation of a student against its teacher: CE, KL, top-1 agreement, calibration."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from toolchain.devices.placement import model_device
from toolchain.distill.batch import IGNORE_INDEX, Batch
from toolchain.distill.losses import SparseTeacher, kl_rows, sparse_buckets
from toolchain.errors import UserError

ECE_BINS = 15


def as_batches(heldout, batch_size: int = 1) -> list[Batch]:
    """Packed blocks [n, L+1] -> Batches of `batch_size`; a list of Batch passes through."""
    if isinstance(heldout, torch.Tensor):
        return [Batch.from_blocks(heldout[i : i + batch_size]) for i in range(0, len(heldout), batch_size)]
    return list(heldout)


def expected_calibration_error(conf: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Token-weighted |accuracy - confidence| over equal-width confidence bins (Guo et al. 2017)."""
    if len(conf) == 0:
        return 0.0
    idx = (conf * bins).long().clamp(max=bins - 1)
    c = conf.new_zeros(bins).index_add_(0, idx, conf)
    a = conf.new_zeros(bins).index_add_(0, idx, correct.float())
    return float((a - c).abs().sum() / len(conf))


@torch.no_grad()
def evaluate(student, teacher, heldout, batch_size: int = 1) -> dict:
    """Token means over loss positions: student CE, teacher CE, KL(teacher || student) at T=1,
    top-1 agreement and the student's expected calibration error (next-token accuracy vs its
    top-1 probability). One sequence at a time by default: full-vocabulary logits of a whole
    batch would set the run's peak memory. Batches with stored top-k targets use them (KL over top-k + tail bucket;
    teacher CE then counts only tokens inside the top-k, so it is left out)."""
    was_training = student.training
    student.eval()
    n_tok = 0
    sums = {"ce": 0.0, "teacher_ce": 0.0, "kl": 0.0, "agree": 0.0}
    confs, corrects, teacher_ce_known = [], [], True
    device = model_device(student)
    for b in as_batches(heldout, batch_size):
        b = b.to(device)  # held-out data stays on the CPU; one sequence at a time goes over
        labels = b.labels.reshape(-1)
        keep = labels != IGNORE_INDEX
        if not keep.any():
            continue
        labels = labels[keep]
        s = student(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float()
        s = s.reshape(-1, s.shape[-1])[keep]
        s_logp = F.log_softmax(s, -1)
        sums["ce"] += float(F.nll_loss(s_logp, labels, reduction="sum"))
        top_p, top_i = s_logp.max(-1)
        confs.append(top_p.exp())
        corrects.append(top_i == labels)
        if b.teacher_topk_ids is not None:
            assert b.teacher_topk_logprobs is not None  # stored together with teacher_topk_ids
            k = b.teacher_topk_ids.shape[-1]
            sp = SparseTeacher(b.teacher_topk_ids.reshape(-1, k)[keep], b.teacher_topk_logprobs.reshape(-1, k)[keep])
            s_b, t_b = sparse_buckets(s, sp, 1.0)
            sums["kl"] += float(kl_rows(t_b, s_b).sum())
            t_top = sp.ids.gather(-1, sp.logprobs.argmax(-1, keepdim=True)).squeeze(-1)
            sums["agree"] += float((top_i == t_top).sum())
            teacher_ce_known = False
        else:
            if teacher is None:
                raise UserError("held-out batches without stored teacher top-k need the teacher model to evaluate")
            t = teacher(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float()
            t = t.reshape(-1, t.shape[-1])[keep]
            v = min(t.shape[-1], s.shape[-1])  # same tokenizer, vocab padding may differ
            t_logp = F.log_softmax(t[:, :v], -1)
            s_v = F.log_softmax(s[:, :v], -1) if v != s.shape[-1] else s_logp
            sums["teacher_ce"] += float(F.nll_loss(t_logp, labels, reduction="sum"))
            sums["kl"] += float(kl_rows(t_logp, s_v).sum())
            sums["agree"] += float((s[:, :v].argmax(-1) == t_logp.argmax(-1)).sum())
        n_tok += len(labels)
    if was_training:
        student.train()
    n = max(1, n_tok)
    return {
        "ce": sums["ce"] / n,
        "teacher_ce": sums["teacher_ce"] / n if teacher_ce_known else None,
        "kl": sums["kl"] / n,
        "top1_agreement": sums["agree"] / n,
        "ece": expected_calibration_error(torch.cat(confs), torch.cat(corrects)) if confs else 0.0,
        "tokens": n_tok,
    }
