"""The distillation loss with the student's output layer folded in (`fused_head_loss`).

Logits are made from final hidden states one slab of tokens at a time and turned into their
loss gradient at once, so no [tokens, vocab] tensor of a whole batch exists; the loss itself is
`losses.chunk_loss_and_grad`, the same function the unfused `chunked_loss` uses.
"""

from __future__ import annotations

import torch

from toolchain.distill.losses import CHUNK_TOKENS, MATMUL_TOKENS, LossSpec, SparseTeacher, chunk_loss_and_grad


class _FusedHeadLoss(torch.autograd.Function):
    """`chunked_loss` with the output layer folded in: logits are made from final hidden states
    one slab of `slab` tokens at a time, for the student (with grad) and the teacher (without),
    so no [tokens, vocab] tensor of a larger batch ever exists. Per slab: logits = h @ W^T, the
    loss gradient g w.r.t. them (computed `chunk` rows at a time, written over the logits),
    then dL/dh = g @ W and dL/dW += g^T @ h. Same matmuls as the unfused path; what is saved
    is the memory traffic of several vocab-sized tensors per step.
    """

    @staticmethod
    def forward(ctx, s_hidden, s_weight, teacher, labels, spec: LossSpec, denom: float, chunk: int, slab: int):
        n = s_hidden.shape[0]
        grad_h = torch.empty_like(s_hidden)
        grad_w = None  # the first slab writes it (no zero-fill of a vocab-sized buffer), the rest add
        ce_sum = s_hidden.new_zeros((), dtype=torch.float32)
        div_sum = ce_sum.clone()
        # under bf16 autocast the hidden states arrive in bf16: the head matmuls and the loss run
        # in the weights' dtype (fp32) here, explicitly, rather than autocast choosing per op
        with torch.autocast(s_hidden.device.type, enabled=False):
            for i in range(0, n, slab):
                rows = slice(i, min(n, i + slab))
                h = s_hidden[rows].to(s_weight.dtype)
                s_logits = h @ s_weight.t()
                # the slab's teacher target: its rows of a SparseTeacher, or logits made here
                t_slab = teacher[rows] if isinstance(teacher, SparseTeacher) else None
                if teacher is not None and t_slab is None:
                    t_h, t_w = teacher
                    t_slab = t_h[rows].to(t_w.dtype) @ t_w.t()
                lab = labels[rows]
                # the loss row block by row block; each block's gradient overwrites its own
                # logits, so the slab's gradient needs no buffer of its own
                for j in range(0, len(lab), chunk):
                    sub = slice(j, j + chunk)
                    tch = None if t_slab is None else t_slab[sub]
                    ce, div, g = chunk_loss_and_grad(s_logits[sub], tch, lab[sub], spec, 1.0 / denom, True)
                    s_logits[sub] = g
                    ce_sum += ce
                    div_sum += div
                del t_slab
                g = s_logits
                grad_h[rows] = g @ s_weight
                if s_weight.requires_grad:
                    grad_w = g.t() @ h if grad_w is None else grad_w.addmm_(g.t(), h)
                del g, s_logits
        ctx.save_for_backward(grad_h, grad_w)
        total = (spec.alpha * ce_sum + (1 - spec.alpha) * spec.temperature**2 * div_sum) / denom
        return torch.stack([total, ce_sum / denom, div_sum / denom])

    @staticmethod
    def backward(ctx, g_out):
        grad_h, grad_w = ctx.saved_tensors
        scale = g_out[0]
        if scale.item() != 1.0:  # (loss.backward() passes 1: hand the buffers over without a copy)
            grad_h, grad_w = grad_h * scale, None if grad_w is None else grad_w * scale
        return grad_h, grad_w, None, None, None, None, None, None


def fused_head_loss(
    s_hidden: torch.Tensor,
    s_weight: torch.Tensor,
    teacher,
    labels: torch.Tensor,
    spec: LossSpec,
    denom: float | None = None,
    chunk: int = CHUNK_TOKENS,
    slab: int = MATMUL_TOKENS,
):
    """(total, ce, divergence) like `chunked_loss`, from student final hidden states [N, H] and its
    output weight [V, H]. teacher: (hidden [N, Ht], weight [V', Ht]), a SparseTeacher, or None."""
    if denom is None:
        denom = float((labels != spec.ignore_index).sum())
    denom = max(1.0, float(denom))
    out = _FusedHeadLoss.apply(s_hidden, s_weight, teacher, labels, spec, denom, chunk, max(chunk, slab))
    return out[0], out[1].detach(), out[2].detach()
