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
