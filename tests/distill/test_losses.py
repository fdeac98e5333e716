import pytest
import torch
import torch.nn.functional as F

from toolchain.distill.losses import IGNORE_INDEX, forward_kl, kd_loss


def test_kl_is_zero_for_identical_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 50, generator=g), torch.randn(6, 50, generator=g)
    labels = torch.zeros(6, dtype=torch.long)
    assert forward_kl(t, t, labels).item() == pytest.approx(0.0, abs=1e-6)
    assert forward_kl(s, t, labels).item() > 0.1


def test_kl_matches_torch_reference_at_temperature():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 30, generator=g), torch.randn(5, 30, generator=g)
    labels = torch.arange(5)
    ref = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="batchmean")
    assert forward_kl(s, t, labels, temperature=2.0).item() == pytest.approx(ref.item(), rel=1e-5)


def test_ignored_positions_do_not_count():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 20, generator=g), torch.randn(4, 20, generator=g)
    labels = torch.tensor([1, 2, IGNORE_INDEX, IGNORE_INDEX])
    s2 = s.clone()
    s2[2:] = 100 * torch.randn(2, 20, generator=g)  # garbage where ignored
    assert forward_kl(s2, t, labels).item() == pytest.approx(forward_kl(s[:2], t[:2], labels[:2]).item(), rel=1e-6)
    loss, _parts = kd_loss(s2, t, labels, alpha=0.5, temperature=1.0)
    loss_ref, _ = kd_loss(s[:2], t[:2], labels[:2], alpha=0.5, temperature=1.0)
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-6)


def test_kd_loss_mixes_ce_and_scaled_kl():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(8, 40, generator=g), torch.randn(8, 40, generator=g)
    labels = torch.randint(0, 40, (8,), generator=g)
    ce = F.cross_entropy(s, labels)
    kl = forward_kl(s, t, labels, temperature=2.0)
    loss, parts = kd_loss(s, t, labels, alpha=0.3, temperature=2.0)
    assert loss.item() == pytest.approx(0.3 * ce.item() + 0.7 * 4.0 * kl.item(), rel=1e-5)
    assert parts["ce"] == pytest.approx(ce.item(), rel=1e-5)


def _sparse_reference(s, t, k, temperature=1.0):
    """Direct computation: teacher top-k + tail bucket vs student mass on the same ids + rest."""
    t_logp = F.log_softmax(t, -1)
    lp, ids = t_logp.topk(k, -1)
    q = F.softmax(s / temperature, -1)
    q_top = q.gather(-1, ids)
    q_tail = 1 - q_top.sum(-1, keepdim=True)
    p_top = lp.exp()
    p_tail = 1 - p_top.sum(-1, keepdim=True)
    if temperature != 1.0:
        v = s.shape[-1]
        p_top = p_top ** (1 / temperature)
        p_tail = (v - k) * (p_tail / (v - k)) ** (1 / temperature)
        z = p_top.sum(-1, keepdim=True) + p_tail
        p_top, p_tail = p_top / z, p_tail / z
    p = torch.cat([p_top, p_tail], -1)
    qq = torch.cat([q_top, q_tail], -1)
    return (p * (p.log() - qq.log())).sum(-1).mean(), ids, lp


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_topk_kl_matches_direct_computation(temperature):
    from toolchain.distill.losses import sparse_forward_kl

    g = torch.Generator().manual_seed(4)
    s, t = (
        torch.randn(10, 60, generator=g, dtype=torch.float64),
        3 * torch.randn(10, 60, generator=g, dtype=torch.float64),
    )
    ref, ids, lp = _sparse_reference(s, t, 8, temperature)
    got = sparse_forward_kl(s, ids, lp, torch.zeros(10, dtype=torch.long), temperature=temperature)
    assert got.item() == pytest.approx(ref.item(), rel=1e-4)


def test_sparse_with_full_support_equals_dense_kl_and_its_gradient():
    from toolchain.distill.losses import sparse_forward_kl

    g = torch.Generator().manual_seed(5)
    s = torch.randn(6, 20, generator=g, requires_grad=True)
    t = torch.randn(6, 20, generator=g)
    lp, ids = F.log_softmax(t, -1).topk(20, -1)  # k = V: tail mass is exactly 0
    labels = torch.tensor([1, 2, 3, IGNORE_INDEX, 4, 5])
    a = sparse_forward_kl(s, ids, lp, labels)
    b = forward_kl(s, t, labels)
    assert a.item() == pytest.approx(b.item(), rel=1e-4)
    ga = torch.autograd.grad(a, s)[0]
    gb = torch.autograd.grad(b, s)[0]
    torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-4)
    assert torch.isfinite(ga).all() and ga[3].abs().max() == 0  # ignored row gets no gradient


def test_sparse_tail_is_stable_when_topk_holds_almost_all_mass():
    from toolchain.distill.losses import sparse_forward_kl

    s = torch.zeros(2, 1000)
    s[:, 0] = 40.0  # student puts ~all mass on id 0: its tail is ~1e-14, below fp32 resolution of 1 - q
    ids = torch.tensor([[0], [0]])
    lp = torch.tensor([[-1e-9], [-1e-9]])
    out = sparse_forward_kl(s.requires_grad_(), ids, lp, torch.zeros(2, dtype=torch.long))
    assert torch.isfinite(out) and out.item() < 1e-6


@pytest.mark.parametrize("kind,alpha,slab", [("forward_kl", 0.0, 512), ("forward_kl", 0.5, 40), ("jsd", 0.2, 32)])
def test_fused_head_equals_full_logits(kind, alpha, slab):
    """Logits made slab by slab (and the loss chunk by chunk) from hidden states: same loss and
    gradients as full logits; slab 40 leaves a partial chunk at each slab's end."""
    from toolchain.distill.head_loss import fused_head_loss
    from toolchain.distill.losses import LossSpec, chunked_loss

    g = torch.Generator().manual_seed(6)
    h = torch.randn(70, 16, generator=g, requires_grad=True)
    w = torch.randn(90, 16, generator=g, requires_grad=True)
    th, tw = torch.randn(70, 12, generator=g), torch.randn(92, 12, generator=g)  # teacher: other width, padded vocab
    labels = torch.randint(0, 90, (70,), generator=g)
    labels[5:9] = IGNORE_INDEX
    spec = LossSpec(kind=kind, alpha=alpha, temperature=2.0, beta=0.3)
    a = fused_head_loss(h, w, (th, tw), labels, spec, chunk=16, slab=slab)[0]
    ga = torch.autograd.grad(a, (h, w))
    b = chunked_loss(h @ w.t(), th @ tw.t(), labels, spec)[0]
    gb = torch.autograd.grad(b, (h, w))
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


def test_all_ignored_batch_gives_zero_loss_and_zero_grad():
    from toolchain.distill.losses import KINDS, LossSpec, chunked_loss

    g = torch.Generator().manual_seed(7)
    s = torch.randn(4, 30, generator=g, requires_grad=True)
    t = torch.randn(4, 30, generator=g)
    labels = torch.full((4,), IGNORE_INDEX)
    for kind in KINDS:
        loss = chunked_loss(s, t, labels, LossSpec(kind=kind, alpha=0.5, temperature=2.0))[0]
        (grad,) = torch.autograd.grad(loss, s)
        assert loss.item() == 0.0 and torch.isfinite(grad).all() and grad.abs().max() == 0


def test_ce_alone_matches_torch_and_has_its_gradient():
    from toolchain.distill.losses import cross_entropy

    g = torch.Generator().manual_seed(8)
    s = torch.randn(9, 40, generator=g, requires_grad=True)
    labels = torch.randint(0, 40, (9,), generator=g)
    labels[2] = IGNORE_INDEX
    a = cross_entropy(s, labels)
    b = F.cross_entropy(s, labels)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    torch.testing.assert_close(torch.autograd.grad(a, s)[0], torch.autograd.grad(b, s)[0])


def test_forward_kl_with_masked_teacher_logits_matches_reference():
    """A teacher that masks tokens with -inf logits (p = 0 there): the closed-form KL falls back
    to log-prob arithmetic for such rows and still equals the direct computation, gradient too."""
    from toolchain.distill.losses import LossSpec, chunked_loss

    g = torch.Generator().manual_seed(11)
    s = torch.randn(6, 40, generator=g, dtype=torch.float64).float().requires_grad_()
    t = torch.randn(6, 40, generator=g)
    t[2, 5:20] = float("-inf")
    labels = torch.randint(0, 40, (6,), generator=g)
    spec = LossSpec(kind="forward_kl", alpha=0.0, temperature=2.0)
    loss = chunked_loss(s, t, labels, spec)[0]
    (grad,) = torch.autograd.grad(loss, s)
    s_ref = s.detach().clone().requires_grad_()
    lp = torch.log_softmax(t / 2, -1)
    lq = torch.log_softmax(s_ref / 2, -1)
    ref = 4 * (lp.exp() * (lp.clamp_min(-1e4) - lq)).sum(-1).mean()
    (grad_ref,) = torch.autograd.grad(ref, s_ref)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(grad, grad_ref, atol=1e-6, rtol=1e-4)


def _reference_divergence(kind: str, t: torch.Tensor, s: torch.Tensor, beta: float, skew: float) -> torch.Tensor:
    """Each divergence written from its definition on probabilities, in float64."""
    p_t, p_s = t.double().softmax(-1), s.double().softmax(-1)

    def kl(p, q):
        return (p * (p.log() - q.log())).sum(-1)

    return {
        "forward_kl": lambda: kl(p_t, p_s),
        "reverse_kl": lambda: kl(p_s, p_t),
        "jsd": lambda: (
            beta * kl(p_t, beta * p_t + (1 - beta) * p_s) + (1 - beta) * kl(p_s, beta * p_t + (1 - beta) * p_s)
        ),
        "skew_kl": lambda: kl(p_t, skew * p_t + (1 - skew) * p_s),
        "skew_reverse_kl": lambda: kl(p_s, skew * p_s + (1 - skew) * p_t),
        "tvd": lambda: 0.5 * (p_t - p_s).abs().sum(-1),
    }[kind]()


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"])
def test_every_divergence_equals_its_definition(kind):
    from toolchain.distill.losses import LossSpec, divergence

    g = torch.Generator().manual_seed(3)
    t, s = torch.randn(6, 50, generator=g) * 3, torch.randn(6, 50, generator=g) * 3
    spec = LossSpec(kind=kind, beta=0.3, skew=0.2)
    got = divergence(s.log_softmax(-1), t.log_softmax(-1), spec)
    want = _reference_divergence(kind, t, s, beta=0.3, skew=0.2)
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5), (got, want)
    assert (want > 1e-3).all()  # the figures compared are not all ~0


def test_bf16_autocast_loss_is_close_to_fp32_and_trains():
    """distill.precision: bf16 runs the matmuls in bf16; the loss stays fp32 and near the fp32 one."""
    from toolchain.distill.head_loss import fused_head_loss
    from toolchain.distill.losses import LossSpec

    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 32, generator=g)
    w = (torch.randn(100, 32, generator=g) * 0.1).requires_grad_(True)
    t = (torch.randn(64, 40, generator=g), torch.randn(100, 40, generator=g) * 0.1)
    labels = torch.randint(0, 100, (64,), generator=g)
    spec = LossSpec(kind="forward_kl", alpha=0.5, temperature=2.0)
    fp32, _, _ = fused_head_loss(h, w, t, labels, spec)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16, _, _ = fused_head_loss(h.bfloat16(), w, t, labels, spec)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16)
    assert abs(float(bf16) - float(fp32)) < 2e-2 * abs(float(fp32))
    bf16.backward()
    assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
