import functools
import math
import operator

import pytest
import torch

from toolchain.config import DataConfig, DistillConfig
from toolchain.data.batch_order import batch_indices
from toolchain.data.corpus import load_documents, split_documents, train_and_heldout
from toolchain.distill import loop
from toolchain.distill.batch import Batch
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
    a = [batch_indices(s, 4, 10, seed=0).tolist() for s in range(5)]
    assert a == [batch_indices(s, 4, 10, seed=0).tolist() for s in range(5)]
    assert sorted(functools.reduce(operator.iadd, a[:2], []) + a[2][:2]) == list(
        range(10)
    )  # first epoch is a permutation


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
    extra = tmp_path / "faq.txt"
    extra.write_text("How do I install it? Run pip install.\n\n" * 200)
    cfg = DistillConfig(
        steps=25,
        batch_size=4,
        lr=3e-3,
        warmup_steps=2,
        checkpoint_every=10,
        alpha=0.0,
        temperature=1.0,
        eval_sets=[str(extra)],
        eval_every=20,
    )
    res = distill_student(teacher, sdir, tmp_path / "out", data, cfg, tmp_path / "work", progress=False)
    assert res["after"]["kl"] < 0.9 * res["before"]["kl"]
    assert set(res["eval_sets"]) == {"heldout", "faq"} and res["eval_sets"]["heldout"]["after"] == res["after"]
    faq = res["eval_sets"]["faq"]["after"]
    assert faq["tokens"] == 8 * 32 and faq["kl"] != res["after"]["kl"]  # its own text, its own figures
    assert 0.0 <= res["after"]["ece"] <= 1.0 and "faq" in res["history"][19]["eval"]
    assert res["tokens"] == 25 * 4 * 32 and res["tokens_per_s"] > 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert (tmp_path / "work" / "checkpoint.pt").is_file()


def test_resume_after_interruption_gives_the_same_model(setup, tmp_path, monkeypatch):
    teacher, sdir, data = setup
    cfg = DistillConfig(steps=6, batch_size=2, lr=1e-3, warmup_steps=1, checkpoint_every=2)
    ref = distill_student(teacher, sdir, tmp_path / "ref", data, cfg, tmp_path / "w_ref", progress=False)

    calls = {"n": 0}
    real = loop.batch_loss

    def crash_at_step_5(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # like Ctrl-C / kill during step 5
        return real(*a, **k)

    monkeypatch.setattr(loop, "batch_loss", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        distill_student(teacher, sdir, tmp_path / "out", data, cfg, tmp_path / "w", progress=False)
    assert not (tmp_path / "out").exists()  # nothing partial at the final path
    assert torch.load(tmp_path / "w" / "checkpoint.pt", weights_only=False)["step"] == 4
    monkeypatch.setattr(loop, "batch_loss", real)
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
    teacher, sdir, _data = setup
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
    teacher, sdir, _data = setup
    train, held = train_and_heldout(teacher.tokenizer, "pydoc", 33, 0.1, 0, 2, max_train_blocks=8)
    big = lambda m: Batch.from_blocks(train[4 * m : 4 * m + 4])
    small = lambda m: Batch.from_blocks(train[2 * m : 2 * m + 2])
    outs = []
    for fn, accum, name in ((big, 1, "a"), (small, 2, "b")):
        student = load_model(str(sdir)).model
        cfg = DistillConfig(steps=2, lr=1e-3, warmup_steps=1, grad_accum=accum, checkpoint_every=100)
        loop.distill(teacher.model, student, fn, held, cfg, tmp_path / name, progress=False)
        outs.append(student.state_dict())
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k], atol=2e-5, rtol=1e-4)  # Adam amplifies fp noise on ~0 grads


def test_compiled_decoder_trains_like_the_eager_one(setup, tmp_path):
    """distill.compile: same weights as eager (to fp tolerance), plain parameter names in the result.
    (alpha=1, so only the student is compiled: one tiny decoder already takes ~40 s here.)"""
    teacher, sdir, _ = setup
    train, held = train_and_heldout(teacher.tokenizer, "pydoc", 33, 0.1, 0, 2, max_train_blocks=8)
    fn = lambda m: Batch.from_blocks(train[2 * m : 2 * m + 2])
    outs = []
    for compile_ in (False, True):
        student = load_model(str(sdir)).model
        cfg = DistillConfig(steps=2, lr=1e-3, warmup_steps=1, checkpoint_every=100, alpha=1.0, compile=compile_)
        loop.distill(teacher.model, student, fn, held[:1], cfg, tmp_path / str(compile_), progress=False)
        outs.append(student.state_dict())
    assert list(outs[0]) == list(outs[1])
    moved = max(
        (a - b).abs().max().item() for a, b in zip(outs[0].values(), load_model(str(sdir)).model.state_dict().values())
    )
    assert moved > 1e-3  # the weights did change, so the comparison below means something
    for k in outs[0]:
        torch.testing.assert_close(outs[1][k], outs[0][k], atol=1e-4, rtol=1e-3)  # Adam amplifies fp noise on ~0 grads


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(setup, tmp_path):
    teacher, sdir, _ = setup
    train, held = train_and_heldout(teacher.tokenizer, "pydoc", 33, 0.1, 0, 2, max_train_blocks=8)
    student = load_model(str(sdir)).model
    poison = {"on": False}

    def batch_fn(m):
        poison["on"] = m == 3  # the 4th step's forward pass produces inf (as a diverging run would)
        return Batch.from_blocks(train[2 * (m % 4) : 2 * (m % 4) + 2])

    student.get_decoder().norm.register_forward_hook(lambda mod, inp, out: out * float("inf") if poison["on"] else out)
    cfg = DistillConfig(steps=6, lr=1e-3, warmup_steps=1, checkpoint_every=2)
    with pytest.raises(UserError, match=r"step 4: loss nan is not finite.*last good checkpoint \(step 2\) is kept"):
        loop.distill(teacher.model, student, batch_fn, held, cfg, tmp_path, progress=False)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_lora_student_is_trained_through_adapters_and_saved_merged(setup, tmp_path):
    from toolchain.config import LoraConfig

    teacher, sdir, data = setup
    cfg = DistillConfig(
        steps=3,
        batch_size=2,
        lr=1e-2,
        warmup_steps=1,
        checkpoint_every=100,
        lora=LoraConfig(r=4, targets=["q_proj", "v_proj"]),
    )
    distill_student(teacher, sdir, tmp_path / "out", data, cfg, tmp_path / "w", progress=False)
    before = load_model(str(sdir)).model.state_dict()
    after = load_model(str(tmp_path / "out")).model.state_dict()
    assert set(before) == set(after)  # merged: a plain model, no lora_A/lora_B tensors
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)
    with pytest.raises(UserError, match="not module names"):
        distill_student(
            teacher,
            sdir,
            tmp_path / "o2",
            data,
            DistillConfig(steps=1, lora=LoraConfig(r=2, targets=["qkv"])),
            tmp_path / "w2",
            progress=False,
        )


def _mapped_mse(student, teacher, blocks, layer_map):
    with torch.no_grad():
        s = student(blocks[:, :-1], output_hidden_states=True).hidden_states
        t = teacher(blocks[:, :-1], output_hidden_states=True).hidden_states
    return sum(float((s[i + 1] - t[j + 1]).pow(2).mean()) for i, j in layer_map) / len(layer_map)


def test_hidden_state_loss_pulls_mapped_layers_together(setup, tmp_path):
    from toolchain.distill.hidden import HiddenMatcher, layer_map_from_meta
    from toolchain.models.load import read_meta

    teacher, sdir, _ = setup
    train, held = train_and_heldout(teacher.tokenizer, "pydoc", 33, 0.1, 0, 2, max_train_blocks=8)
    student = load_model(str(sdir)).model
    layer_map = layer_map_from_meta(read_meta(sdir), 3)
    assert len(layer_map) == 3 and layer_map[-1][1] == 5  # the last block is kept
    before = _mapped_mse(student, teacher.model, train, layer_map)
    cfg = DistillConfig(
        steps=6,
        batch_size=4,
        lr=3e-3,
        warmup_steps=1,
        checkpoint_every=3,
        alpha=1.0,
        hidden_loss="mse",
        hidden_weight=10.0,
    )
    loop.distill(
        teacher.model,
        student,
        loop.packed_batches(train, 4, 0),
        held,
        cfg,
        tmp_path,
        progress=False,
        layer_map=layer_map,
    )
    assert _mapped_mse(student, teacher.model, train, layer_map) < 0.8 * before
    # widths that differ get a learned projection, which receives gradients
    m = HiddenMatcher([(0, 1)], 8, 12, "cosine")
    s_states = (None, torch.randn(2, 3, 8, requires_grad=True))
    t_states = (None, None, torch.randn(2, 3, 12))
    m(s_states, t_states, torch.ones(2, 3, dtype=torch.bool), 6.0).backward()
    assert m.proj[0].weight.grad.abs().sum() > 0


def test_bf16_precision_trains_close_to_fp32(setup, tmp_path):
    """distill.precision bf16 (autocast matmuls) follows the fp32 run's losses closely, yet is
    not the fp32 run (autocast is in effect)."""
    teacher, sdir, data = setup
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = DistillConfig(steps=4, batch_size=2, lr=1e-3, warmup_steps=1, checkpoint_every=10, precision=precision)
        res = distill_student(
            teacher, sdir, tmp_path / precision, data, cfg, tmp_path / f"w-{precision}", progress=False
        )
        losses[precision] = [h["loss"] for h in res["history"]]
    assert all(math.isfinite(v) for v in losses["bf16"])
    assert losses["bf16"] != losses["fp32"]
    assert max(abs(a - b) / abs(b) for a, b in zip(losses["bf16"], losses["fp32"])) < 0.05, losses
