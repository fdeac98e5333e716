"""Distillation losses: standalone functions on flattened [tokens, vocab] logits.

Conventions (torchtune's):
- softmaxes run in fp32 whatever the logits' dtype;
- means are token-weighted over positions whose label is not `ignore_index`, so padding and
  prompt tokens never dilute the loss; a batch with no loss token gives 0 (not NaN);
- the work is chunked over tokens: each chunk's loss *and its gradient* are computed in the
  forward pass (`_ChunkedLoss`), so the full-vocabulary distributions exist for one chunk at a
  time, and autograd never holds the [tokens, vocab] softmax intermediates of the whole batch.

Temperature T divides both student and teacher logits; divergence terms are multiplied by T^2
(Hinton et al.) so their gradients keep the scale of the hard-label CE as T changes. The CE term
always uses T=1 logits.

A teacher target is either dense logits [N, V] (online teacher) or a `SparseTeacher` (offline
cache: top-k ids and their T=1 log-probs). Sparse targets are compared over k+1 "buckets": the
k stored ids plus one tail bucket holding all other ids (see `sparse_buckets`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from toolchain.config import DISTILL_LOSSES as KINDS
from toolchain.formats import IGNORE_INDEX

CHUNK_TOKENS = 128  # 128 x 49152 fp32 = 25 MB per temporary: stays in a few cache-friendly buffers
# The fused head's matmuls run over slabs of this many tokens: vocab-sized products are ~20%
# faster at M=512 than M=128 on this CPU (MKL, 2 threads: 92 vs 77 GFLOPS for h @ W^T, 92 vs
# 66 for g^T @ h), and the head is a third of a KD step. Two [512, V] slabs (100 MB each at
# V=49k) are live; the loss itself still works CHUNK_TOKENS rows at a time.
MATMUL_TOKENS = 512
_NEG = -1e4  # stands for log(0): exp() underflows to exactly 0, and 0 * finite stays finite


@dataclass(frozen=True)
class LossSpec:
    kind: str = "forward_kl"  # one of KINDS
    alpha: float = 0.0  # weight of hard-label CE; (1 - alpha) goes to T^2 * divergence
    temperature: float = 1.0
    beta: float = 0.5  # generalized JSD: mixture M = beta * teacher + (1 - beta) * student (TRL's GKD)
    skew: float = 0.1  # skew KL: KL(P || skew * P + (1 - skew) * Q) (DistiLLM)
    ignore_index: int = IGNORE_INDEX


@dataclass
class SparseTeacher:
    """Offline teacher target: its top-k ids and log-probs at T=1 (normalised over the full vocab)."""

    ids: torch.Tensor  # [N, k] long
    logprobs: torch.Tensor  # [N, k] float

    def __getitem__(self, rows) -> SparseTeacher:
        return SparseTeacher(self.ids[rows], self.logprobs[rows])


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def sparse_buckets(s: torch.Tensor, teacher: SparseTeacher, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) log-probs over k+1 buckets: the teacher's top-k ids, then the tail.

    Student (full logits known, so exact at any T): log q_T on the k ids, and its tail
    log(1 - sum q_T(ids)) computed as logsumexp over the logits with the k ids masked out minus
    the full logsumexp, which never subtracts two nearly equal probabilities.
    Teacher (only top-k known): the tail mass is log1mexp(logsumexp(top-k log-probs)). At T=1
    this is exact. For T != 1 the tempered teacher is p_i^(1/T) renormalised, with the tail
    assumed spread evenly over the V-k ids it covers (its tempered mass is
    (V-k) * (p_tail / (V-k))^(1/T)); that is the only assumption the cache forces.
    """
    t, v = temperature, s.shape[-1]
    s_t = s / t
    lse = torch.logsumexp(s_t, -1, keepdim=True)
    ids = teacher.ids
    s_top = s_t.gather(-1, ids) - lse
    # masked with a finite "log 0" (not -inf) so k = V (empty tail) stays finite, gradient included
    s_tail = torch.logsumexp(s_t.scatter(-1, ids, _NEG), -1, keepdim=True) - lse
    t_top = teacher.logprobs.float()
    # a tail under ~1e-6 is below what fp32 top-k log-probs can resolve (their sum is 1 +- a few
    # ulps); it counts as 0 rather than as rounding noise pulling the student's tail up
    t_sum = torch.logsumexp(t_top, -1, keepdim=True)
    t_tail = torch.where(t_sum > -1e-6, torch.full_like(t_sum, _NEG), log1mexp(t_sum)).clamp_min(_NEG)
    if t != 1.0:
        n_tail = math.log(max(1, v - ids.shape[-1]))
        t_tail = n_tail + (t_tail - n_tail) / t
        t_top = t_top / t
        t_all = torch.cat([t_top, t_tail], -1)
        t_all = t_all - torch.logsumexp(t_all, -1, keepdim=True)
    else:
        t_all = torch.cat([t_top, t_tail], -1)
    return torch.cat([s_top, s_tail], -1), t_all.clamp_min(_NEG)


def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-row KL(P || Q) from log-probs; log_p is clamped so p = 0 rows contribute 0."""
    log_p = log_p.clamp_min(_NEG)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def divergence(s_logp: torch.Tensor, t_logp: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """Per-row divergence between teacher and student log-prob rows (same support)."""
    kind = spec.kind
    if kind == "forward_kl":
        return kl_rows(t_logp, s_logp)
    if kind == "reverse_kl":
        return kl_rows(s_logp, t_logp)
    if kind == "jsd":
        # TRL's generalized_jsd_loss: beta=0 is forward KL(T||S), beta=1 reverse KL(S||T),
        # else beta * KL(T||M) + (1 - beta) * KL(S||M) with M = beta * T + (1 - beta) * S.
        b = spec.beta
        if b == 0.0:
            return kl_rows(t_logp, s_logp)
        if b == 1.0:
            return kl_rows(s_logp, t_logp)
        m = torch.logsumexp(torch.stack([s_logp + math.log(1 - b), t_logp + math.log(b)]), 0)
        return b * kl_rows(t_logp, m) + (1 - b) * kl_rows(s_logp, m)
    if kind in ("skew_kl", "skew_reverse_kl"):
        a = spec.skew
        p, q = (t_logp, s_logp) if kind == "skew_kl" else (s_logp, t_logp)
        if a == 0.0:
            return kl_rows(p, q)
        m = torch.logsumexp(torch.stack([p + math.log(a), q + math.log(1 - a)]), 0) if a < 1.0 else p
        return kl_rows(p, m)
    if kind == "tvd":
        return 0.5 * (t_logp.exp() - s_logp.exp()).abs().sum(-1)
    raise ValueError(f"unknown loss kind {kind!r}; choose from {', '.join(KINDS)}")


def _softmax_rows(x: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """softmax(x / T) in a new buffer, with the row max and log-normaliser, so that
    log softmax = (x - max) / T - log_z: one exp pass, not the three of log_softmax + exp."""
    m = x.amax(-1, keepdim=True)
    e = torch.sub(x, m)
    if temperature != 1.0:
        e.div_(temperature)
    e.exp_()
    z = e.sum(-1, keepdim=True)
    e.div_(z)
    return e, m.squeeze(-1), z.squeeze(-1).log()


def _softmax_pair_kl(s: torch.Tensor, t: torch.Tensor, temperature: float):
    """Per-row KL(P || Q) for P = softmax(t / T), Q = softmax(s / T), and the buffers q, p.

    sum_i p_i (log p_i - log q_i) = [sum_i p_i (t_i - s_i) - (max_t - max_s)] / T - log z_t + log z_s,
    so the KL needs no log-prob arrays: two exp passes per element in all, where log_softmax of
    both sides and the exps for the KL and the gradient took five (a 128 x 49k chunk is 6.3M
    elements per pass). Rows with infinite logits (a teacher masking tokens with -inf) fall
    back to log-prob arithmetic.
    """
    p, mt, lzt = _softmax_rows(t, temperature)
    q, ms, lzs = _softmax_rows(s, temperature)
    d = torch.sub(t, s).mul_(p)
    div = (d.sum(-1) - (mt - ms)) / temperature - lzt + lzs
    del d
    if not torch.isfinite(div).all():
        log_p = torch.log_softmax(t / temperature, -1)
        div = kl_rows(log_p, torch.log_softmax(s / temperature, -1))
    return div, q, p


def chunk_loss_and_grad(
    s: torch.Tensor, teacher, labels: torch.Tensor, spec: LossSpec, scale: float, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Summed (CE, divergence) over one chunk's loss tokens, and d(scale * loss)/d(student logits)."""
    t = spec.temperature
    mask = labels != spec.ignore_index
    w = mask.float()
    s32 = s.float()
    if teacher is not None and not isinstance(teacher, SparseTeacher):
        v = min(s32.shape[-1], teacher.shape[-1])  # same tokenizer; vocab padding may differ
        teacher = teacher[:, :v]
    else:
        v = s32.shape[-1]
    if (spec.kind == "forward_kl" or teacher is None) and not isinstance(teacher, SparseTeacher):
        # Closed form, no autograd graph: d KL(P||Q_T) / d s = (q_T - p) / T; d CE / d s = q - onehot.
        with torch.no_grad():
            div = torch.zeros(len(s32), device=s32.device)
            grad: torch.Tensor | None = None
            if teacher is not None:
                div, q_t, p_t = _softmax_pair_kl(s32[:, :v], teacher.float(), t)
                if need_grad:  # in place on the two softmax buffers: no further [chunk, V] temporaries
                    g = q_t.sub_(p_t).mul_(((1 - spec.alpha) * t * w * scale).unsqueeze(-1))
                    if v == s32.shape[-1]:
                        grad = g
                    else:
                        grad = torch.zeros_like(s32)
                        grad[:, :v] = g
                del p_t, q_t
            if need_grad and grad is None:
                grad = torch.zeros_like(s32)
            ce = torch.zeros_like(div)
            if spec.alpha > 0:
                logq = torch.log_softmax(s32, -1)
                safe = labels.clamp_min(0)
                ce = -logq.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
                if need_grad and grad is not None:  # grad is set above whenever need_grad
                    g_ce = logq.exp_()
                    g_ce.scatter_add_(-1, safe.unsqueeze(-1), -torch.ones_like(ce).unsqueeze(-1))
                    grad += g_ce * (spec.alpha * w * scale).unsqueeze(-1)
            return (ce * w).sum(), (div * w).sum(), grad
    with torch.enable_grad():
        s_leaf = s32.detach().requires_grad_(need_grad)
        if teacher is None:  # hard-label CE only (alpha = 1, or plain fine-tuning)
            div = torch.zeros(len(s32), device=s32.device)
        else:
            if isinstance(teacher, SparseTeacher):
                s_logp, t_logp = sparse_buckets(s_leaf, teacher, t)
            else:
                s_logp = torch.log_softmax(s_leaf[:, :v] / t, -1)
                t_logp = torch.log_softmax(teacher.float() / t, -1)
            div = divergence(s_logp, t_logp, spec)
        ce = F.cross_entropy(s_leaf, labels, ignore_index=spec.ignore_index, reduction="none")
        total = ((spec.alpha * ce + (1 - spec.alpha) * t * t * div) * w).sum() * scale
        grad = torch.autograd.grad(total, s_leaf)[0] if need_grad and total.requires_grad else None
        if need_grad and grad is None:
            grad = torch.zeros_like(s32)
    return (ce.detach() * w).sum(), (div.detach() * w).sum(), grad


class _ChunkedLoss(torch.autograd.Function):
    """Loss over [N, V] student logits with the gradient computed chunk by chunk in forward.

    Returns a 3-vector (total, ce, divergence), each a token mean (divided by `denom`); only
    `total` carries a gradient. Holding d(total)/d(logits) costs one [N, V] buffer, instead of
    the several softmax intermediates autograd would keep.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher, labels, spec: LossSpec, denom: float, chunk: int):
        need_grad = student_logits.requires_grad
        n = student_logits.shape[0]
        grad = torch.empty_like(student_logits) if need_grad else None
        ce_sum = student_logits.new_zeros((), dtype=torch.float32)
        div_sum = ce_sum.clone()
        for i in range(0, n, chunk):
            rows = slice(i, min(n, i + chunk))
            tch = None if teacher is None else teacher[rows]
            ce, div, g = chunk_loss_and_grad(
                student_logits[rows].detach(), tch, labels[rows], spec, 1.0 / denom, need_grad
            )
            ce_sum += ce
            div_sum += div
            if grad is not None and g is not None:  # both are set exactly when need_grad
                grad[rows] = g
        ctx.save_for_backward(grad)
        t2 = spec.temperature**2
        total = (spec.alpha * ce_sum + (1 - spec.alpha) * t2 * div_sum) / denom
        return torch.stack([total, ce_sum / denom, div_sum / denom])

    @staticmethod
    def backward(ctx, g_out):
        (grad,) = ctx.saved_tensors
        return grad * g_out[0], None, None, None, None, None


def chunked_loss(
    student_logits: torch.Tensor,
    teacher,
    labels: torch.Tensor,
    spec: LossSpec,
    denom: float | None = None,
    chunk: int = CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, ce, divergence) token means; `denom` (default: this batch's loss tokens) lets
    gradient accumulation weight micro-batches by their token counts. teacher: dense [N, V]
    logits, a SparseTeacher, or None (pure CE, i.e. SFT)."""
    if denom is None:
        denom = float((labels != spec.ignore_index).sum())
    denom = max(1.0, float(denom))
    out = _ChunkedLoss.apply(student_logits, teacher, labels, spec, denom, chunk)
    return out[0], out[1].detach(), out[2].detach()


def _divergence_mean(student_logits, teacher, labels, spec: LossSpec) -> torch.Tensor:
    """Differentiable token-mean divergence alone (alpha = 0, without the T^2 factor)."""
    return chunked_loss(student_logits, teacher, labels, spec)[0] / spec.temperature**2


def _div_only(kind: str, **kw):
    def fn(student_logits, teacher_logits, labels, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX, **extra):
        spec = LossSpec(kind=kind, alpha=0.0, temperature=temperature, ignore_index=ignore_index, **{**kw, **extra})
        return _divergence_mean(student_logits, teacher_logits, labels, spec)

    fn.__name__ = kind
    fn.__doc__ = f"Token-mean {kind} between teacher_T and student_T over unmasked positions (no T^2 factor)."
    return fn


forward_kl = _div_only("forward_kl")
reverse_kl = _div_only("reverse_kl")
tvd = _div_only("tvd")


def generalized_jsd(
    student_logits,
    teacher_logits,
    labels,
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
):
    """TRL GKD's generalized JSD(beta): 0 = forward KL, 1 = reverse KL (token mean, no T^2)."""
    spec = LossSpec(kind="jsd", beta=beta, temperature=temperature, ignore_index=ignore_index)
    return _divergence_mean(student_logits, teacher_logits, labels, spec)


def skew_kl(
    student_logits,
    teacher_logits,
    labels,
    skew: float = 0.1,
    temperature: float = 1.0,
    reverse: bool = False,
    ignore_index: int = IGNORE_INDEX,
):
    """Skew KL(P || a P + (1-a) Q), P = teacher (or the student when reverse), token mean."""
    spec = LossSpec(
        kind="skew_reverse_kl" if reverse else "skew_kl", skew=skew, temperature=temperature, ignore_index=ignore_index
    )
    return _divergence_mean(student_logits, teacher_logits, labels, spec)


def sparse_forward_kl(
    student_logits, topk_ids, topk_logprobs, labels, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX
):
    """Forward KL against an offline top-k teacher plus one tail bucket (see `sparse_buckets`)."""
    spec = LossSpec(kind="forward_kl", temperature=temperature, ignore_index=ignore_index)
    return _divergence_mean(student_logits, SparseTeacher(topk_ids, topk_logprobs), labels, spec)


def cross_entropy(student_logits, labels, ignore_index: int = IGNORE_INDEX):
    """Token-mean CE; 0 (not NaN) when every label is ignored."""
    return chunked_loss(student_logits, None, labels, LossSpec(alpha=1.0, ignore_index=ignore_index))[0]


def kd_loss(
    student_logits,
    teacher_logits,
    labels,
    alpha: float,
    temperature: float,
    ignore_index: int = IGNORE_INDEX,
    kind: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
) -> tuple[torch.Tensor, dict]:
    """alpha * CE + (1 - alpha) * T^2 * D(teacher_T, student_T); teacher may be a SparseTeacher."""
    spec = LossSpec(kind=kind, alpha=alpha, temperature=temperature, beta=beta, skew=skew, ignore_index=ignore_index)
    loss, ce, div = chunked_loss(student_logits, teacher_logits, labels, spec)
    return loss, {"ce": float(ce), "kl_t": float(div)}
