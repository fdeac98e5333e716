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
    loss, parts = kd_loss(s2, t, labels, alpha=0.5, temperature=1.0)
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
    s, t = torch.randn(10, 60, generator=g, dtype=torch.float64), 3 * torch.randn(10, 60, generator=g, dtype=torch.float64)
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
