"""The divergence guard stops a run that makes the student worse, and keeps the best weights;
the default optimiser settings converge on every architecture we support."""

import pytest
import torch
from conftest import make_tiny_causal_lm
from safetensors.torch import load_file

from toolchain.config import DataConfig, DistillConfig
from toolchain.distill.guard import DivergenceGuard, resolve_eval_every
from toolchain.distill.run import distill_student
from toolchain.errors import DivergenceError
from toolchain.models.load import load_model
from toolchain.student import build_student


def test_guard_tracks_the_best_and_stops_on_a_clear_rise():
    model = torch.nn.Linear(2, 2)
    g = DivergenceGuard(ratio=1.5)
    assert g.observe(0, {"kl": 4.0, "ce": 8.0}, model) is None
    with torch.no_grad():
        model.weight.add_(1.0)
    kept = model.weight.clone()
    assert g.observe(10, {"kl": 3.0, "ce": 7.0}, model) is None and g.best == {"step": 10, "kl": 3.0, "ce": 7.0}
    assert g.observe(20, {"kl": 4.4, "ce": 7.1}, model) is None  # worse, but not clearly: noise
    with torch.no_grad():
        model.weight.zero_()
    reason = g.observe(30, {"kl": 4.6, "ce": 7.0}, model)
    assert reason is not None and "KL rose to 4.600 at step 30" in reason and "3.000" in reason
    g.restore_best(model)
    assert torch.equal(model.weight, kept)
    assert "not finite" in DivergenceGuard(ratio=0).observe(1, {"kl": float("nan")}, model)
    off = DivergenceGuard(ratio=0)
    off.observe(0, {"kl": 1.0}, model)
    assert off.observe(1, {"kl": 100.0}, model) is None  # off: figures tracked, never stops


def test_auto_eval_every_gives_about_five_evaluations():
    assert [resolve_eval_every("auto", n) for n in (0, 3, 8, 60, 1000)] == [0, 1, 2, 12, 200]
    assert resolve_eval_every(7, 60) == 7


@pytest.fixture(scope="module")
def tiny_student(tiny_dir_6, tmp_path_factory):
    teacher = load_model(str(tiny_dir_6))
    calib = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(0))
    sdir = tmp_path_factory.mktemp("guard") / "init"
    build_student(teacher, sdir, 3, calib)
    return teacher, sdir


def test_absurd_lr_stops_early_names_the_cause_and_keeps_the_best(tiny_student, tmp_path):
    teacher, sdir = tiny_student
    data = DataConfig(seq_len=32, eval_sequences=4)
    cfg = DistillConfig(steps=40, batch_size=2, lr=1.0, warmup_steps=1, checkpoint_every=1, eval_every=2)
    with pytest.raises(DivergenceError) as err:
        distill_student(teacher, sdir, tmp_path / "out", data, cfg, tmp_path / "work", progress=False)
    msg, figs = str(err.value), err.value.figures
    assert "diverged" in msg and "Lower distill.lr (now 1" in msg and "best student is kept in" in msg
    assert figs["last"]["step"] < 40  # stopped early, not after the whole run
    assert figs["best"]["step"] < figs["last"]["step"] and figs["last"]["kl"] > 1.5 * figs["best"]["kl"]
    assert not (tmp_path / "out").exists()  # the diverged student is not saved as the result
    best = load_file(tmp_path / "work" / "best-student" / "model.safetensors")
    if figs["best"]["step"] == 0:  # nothing improved on the initial student: the kept one is it
        init = load_file(sdir / "model.safetensors")
        assert all(torch.equal(best[k], init[k]) for k in init)
    # a rerun must not resume into the diverged weights
    assert not (tmp_path / "work" / "checkpoint.pt").exists()
    assert (tmp_path / "work" / "checkpoint.diverged.pt").exists()


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "gemma3_text"])
def test_default_optimiser_settings_converge_on_each_architecture(model_type, tiny_dir, tmp_path):
    """lr, warmup, clipping and the guard as the defaults have them; a student that is a
    perturbed copy of a random teacher (a random teacher does not model text, so the pull
    towards it is the learnable signal; alpha = 0 for the same reason)."""
    tdir = make_tiny_causal_lm(tmp_path / "teacher", tiny_dir, model_type, layers=3)
    teacher = load_model(str(tdir))
    sdir = tmp_path / "student"
    calib = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(0))
    build_student(teacher, sdir, 3, calib)
    noisy = load_file(sdir / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for k, v in noisy.items():
        if "layers" in k and v.dim() == 2:
            v.add_(torch.randn(v.shape, generator=g) * 0.05)
    from safetensors.torch import save_file

    save_file(noisy, sdir / "model.safetensors", metadata={"format": "pt"})
    defaults = DistillConfig()
    cfg = DistillConfig(steps=16, batch_size=2, alpha=0.0, checkpoint_every=100)
    assert (cfg.lr, cfg.warmup_steps, cfg.grad_clip) == (defaults.lr, defaults.warmup_steps, defaults.grad_clip)
    res = distill_student(
        teacher,
        sdir,
        tmp_path / "out",
        DataConfig(seq_len=32, eval_sequences=4),
        cfg,
        tmp_path / "work",
        progress=False,
    )
    # 16 steps at the default lr: a small but steady pull (benchmarks/lr_range.py: 1-5% on these)
    assert res["after"]["kl"] < 0.995 * res["before"]["kl"], (res["before"], res["after"])
    assert res["best"]["step"] > 0
