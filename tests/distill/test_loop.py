import pytest
import torch

from toolchain.config import DataConfig, DistillConfig
from toolchain.distill.batch import Batch
from toolchain.distill import loop
from toolchain.distill.data import load_documents, split_documents, train_and_heldout
from toolchain.distill.run import distill_student
from toolchain.errors import UserError
from toolchain.models.load import load_model
from toolchain.student import build_student


def test_split_is_by_document_and_seeded():
    docs = load_documents("pydoc")
    tr, held = split_documents(docs, 0.1, seed=0)
    assert len(tr) + len(held) == len(docs) and not set(tr) & set(held)
    assert split_documents(docs, 0.1, seed=0) == (tr, held)
    assert split_documents(docs, 0.1, seed=1) != (tr, held)


def test_batches_are_reproducible_and_cover_data():
    a = [loop._batch_indices(s, 4, 10, seed=0).tolist() for s in range(5)]
    assert a == [loop._batch_indices(s, 4, 10, seed=0).tolist() for s in range(5)]
    assert sorted(sum(a[:2], []) + a[2][:2]) == list(range(10))  # first epoch is a permutation


@pytest.fixture(scope="module")
def setup(tiny_dir_6, tmp_path_factory):
    teacher = load_model(str(tiny_dir_6))
    calib = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(0))
    sdir = tmp_path_factory.mktemp("student") / "init"
    build_student(teacher, sdir, 3, calib)
    data = DataConfig(seq_len=32, eval_sequences=8)
    return teacher, sdir, data


def test_distillation_lowers_heldout_kl(setup, tmp_path):
    """A student made as a noisy copy of the teacher must be pulled back towards it.

    (Random tiny teachers do not model text, so a depth-pruned random student has little
    learnable signal in a few steps; a perturbed copy has a clear one.)"""
    teacher, _, data = setup
    from transformers import AutoModelForCausalLM

    calib = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(0))
    sdir = tmp_path / "noisy"
    build_student(teacher, sdir, 6, calib)
    noisy = AutoModelForCausalLM.from_pretrained(sdir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in noisy.named_parameters():
            if "layers" in name and p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    noisy.save_pretrained(sdir)
    # alpha=0: a random teacher does not model the text, so the hard-label term would pull away from it
    cfg = DistillConfig(steps=25, batch_size=4, lr=3e-3, warmup_steps=2, checkpoint_every=10, alpha=0.0, temperature=1.0)
    res = distill_student(teacher, sdir, tmp_path / "out", data, cfg, tmp_path / "work", progress=False)
    assert res["after"]["kl"] < 0.9 * res["before"]["kl"]
    assert res["tokens"] == 25 * 4 * 32 and res["tokens_per_s"] > 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert (tmp_path / "work" / "checkpoint.pt").is_file()


def test_resume_after_interruption_gives_the_same_model(setup, tmp_path, monkeypatch):
    teacher, sdir, data = setup
    cfg = DistillConfig(steps=6, batch_size=2, lr=1e-3, warmup_steps=1, checkpoint_every=2)
    ref = distill_student(teacher, sdir, tmp_path / "ref", data, cfg, tmp_path / "w_ref", progress=False)

    calls = {"n": 0}
    real = loop.chunked_loss

    def crash_at_step_5(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # like Ctrl-C / kill during step 5
        return real(*a, **k)

    monkeypatch.setattr(loop, "chunked_loss", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        distill_student(teacher, sdir, tmp_path / "out", data, cfg, tmp_path / "w", progress=False)
    assert not (tmp_path / "out").exists()  # nothing partial at the final path
    assert torch.load(tmp_path / "w" / "checkpoint.pt", weights_only=False)["step"] == 4
    monkeypatch.setattr(loop, "chunked_loss", real)
    res = distill_student(teacher, sdir, tmp_path / "out", data, cfg, tmp_path / "w", progress=False)

    a = load_model(str(tmp_path / "ref")).model.state_dict()
    b = load_model(str(tmp_path / "out")).model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    assert res["after"]["kl"] == pytest.approx(ref["after"]["kl"], rel=1e-5)


def test_tokenizer_mismatch_is_refused(setup, tmp_path):
    teacher, sdir, data = setup
    from transformers import AutoTokenizer

    other = tmp_path / "other"
    import shutil

    shutil.copytree(sdir, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<brand-new-token>"])
    tok.save_pretrained(other)
    with pytest.raises(UserError, match="tokenizers differ"):
        distill_student(teacher, other, tmp_path / "o", data, DistillConfig(steps=1), tmp_path / "w", progress=False)


def test_train_and_heldout_shapes(setup):
    teacher, _, _ = setup
    train, held = train_and_heldout(teacher.tokenizer, "pydoc", 65, 0.1, 0, 4)
    assert train.shape[1] == 65 and held.shape == (4, 65)


def _cached_batches(teacher_model, blocks, k=8, pad_last=5):
    """Batches carrying the teacher's top-k log-probs (as an offline cache would), one row right-padded."""
    from toolchain.distill.batch import IGNORE_INDEX, Batch

    out = []
    for i in range(0, len(blocks), 2):
        b = Batch.from_blocks(blocks[i : i + 2].clone())
        b.attention_mask = torch.ones_like(b.input_ids)
        b.attention_mask[0, -pad_last:] = 0
        b.labels[0, -pad_last:] = IGNORE_INDEX
        with torch.no_grad():
            lp = torch.log_softmax(teacher_model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, -1)
        b.teacher_topk_logprobs, b.teacher_topk_ids = lp.topk(k, -1)
        out.append(b)
    return out


def test_training_from_stored_topk_needs_no_teacher(setup, tmp_path):
    teacher, sdir, data = setup
    train, _ = train_and_heldout(teacher.tokenizer, "pydoc", 33, 0.1, 0, 4, max_train_blocks=8)
    batches = _cached_batches(teacher.model, train)
    student = load_model(str(sdir)).model
    cfg = DistillConfig(steps=12, lr=3e-3, warmup_steps=1, checkpoint_every=100, alpha=0.0, temperature=1.0)
    res = loop.distill(None, student, lambda m: batches[m % len(batches)], batches, cfg, tmp_path, progress=False)
    assert res["after"]["kl"] < 0.9 * res["before"]["kl"]
    assert res["after"]["teacher_ce"] is None  # not knowable from top-k alone
    assert res["tokens"] == 12 * (2 * 32 - 5)  # padding is not counted
    plain = Batch.from_blocks(train[:2])
    with pytest.raises(UserError, match="teacher model is needed"):
        loop.distill(None, student, lambda m: plain, batches, cfg, tmp_path / "b", progress=False)


def test_grad_accumulation_matches_one_big_batch(setup, tmp_path):
    """Two micro-batches of 2 with accumulation = one batch of 4 (token-weighted): same weights."""
    teacher, sdir, data = setup
    train, held = train_and_heldout(teacher.tokenizer, "pydoc", 33, 0.1, 0, 2, max_train_blocks=8)
    big = lambda m: Batch.from_blocks(train[4 * m : 4 * m + 4])  # noqa: E731
    small = lambda m: Batch.from_blocks(train[2 * m : 2 * m + 2])  # noqa: E731
    outs = []
    for fn, accum, name in ((big, 1, "a"), (small, 2, "b")):
        student = load_model(str(sdir)).model
        cfg = DistillConfig(steps=2, lr=1e-3, warmup_steps=1, grad_accum=accum, checkpoint_every=100)
        loop.distill(teacher.model, student, fn, held, cfg, tmp_path / name, progress=False)
        outs.append(student.state_dict())
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k], atol=2e-5, rtol=1e-4)  # Adam amplifies fp noise on ~0 grads
