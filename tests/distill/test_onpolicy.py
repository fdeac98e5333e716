import pytest
import torch

from toolchain.config import DistillConfig
from toolchain.distill import loop
from toolchain.distill.batch import IGNORE_INDEX, Batch
from toolchain.distill.onpolicy import is_on_policy, on_policy_batch
from toolchain.errors import UserError
from toolchain.models.load import load_model


@pytest.fixture(scope="module")
def models(tiny_dir, tiny_dir_6):
    return load_model(str(tiny_dir_6)).model, load_model(str(tiny_dir)).model


def _blocks(n=4, length=25):
    return torch.randint(10, 2000, (n, length), generator=torch.Generator().manual_seed(0))


def test_on_policy_batch_keeps_prompt_samples_rest_and_is_seeded(models):
    _, student = models
    cfg = DistillConfig(on_policy_fraction=1.0, on_policy_prompt_tokens=8)
    b = Batch.from_blocks(_blocks())
    a1 = on_policy_batch(student, b, cfg, micro_step=3, eos_ids=[])
    a2 = on_policy_batch(student, b, cfg, micro_step=3, eos_ids=[])
    c = on_policy_batch(student, b, cfg, micro_step=4, eos_ids=[])
    assert a1.input_ids.shape == b.input_ids.shape
    assert torch.equal(a1.input_ids[:, :8], b.input_ids[:, :8])
    assert not torch.equal(a1.input_ids[:, 8:], b.input_ids[:, 8:])  # the continuation is the student's
    assert torch.equal(a1.input_ids, a2.input_ids) and not torch.equal(a1.input_ids, c.input_ids)
    assert (a1.labels[:, :7] == IGNORE_INDEX).all() and (a1.labels[:, 7:] != IGNORE_INDEX).all()
    assert torch.equal(a1.labels[:, 7:-1], a1.input_ids[:, 8:])


def test_tokens_after_a_sampled_end_token_are_masked(models):
    _, student = models
    cfg = DistillConfig(on_policy_fraction=1.0, on_policy_prompt_tokens=4)
    b = Batch.from_blocks(_blocks(2, 41))
    vocab_ids = on_policy_batch(student, b, cfg, 0, eos_ids=[]).input_ids
    eos = int(vocab_ids[0, 10])  # pretend the token sampled at position 10 ends the sequence
    a = on_policy_batch(student, b, cfg, 0, eos_ids=[eos])
    row = a.input_ids[0]
    first = 4 + int((row[4:] == eos).nonzero()[0])
    assert a.labels[0, first - 1] == eos and (a.labels[0, first:] == IGNORE_INDEX).all()
    assert (a.attention_mask[0, first:] == 0).all() and (a.attention_mask[0, :first] == 1).all()


def _chat_batch(tokenizer, rows=3):
    from toolchain.distill.sequences import encode_pairs

    answer = {"role": "assistant", "content": "spam"}
    msgs = [[{"role": "user", "content": "Is this spam? " + "win money " * (i + 1)}, answer] for i in range(rows)]
    return encode_pairs(tokenizer, msgs, seq_len=96).batch(range(rows), one_hot_targets=False)


def test_chat_rows_are_answered_from_the_end_of_each_prompt(models, tiny_dir):
    """On chat rows the student answers each prompt where its answer starts (prompts of
    different lengths), learning only its own answer tokens, up to its end token."""
    from transformers import AutoTokenizer

    _, student = models
    b = _chat_batch(AutoTokenizer.from_pretrained(tiny_dir))
    learned = b.labels != IGNORE_INDEX
    starts = learned.float().argmax(1) + 1  # prompt lengths
    assert len(set(starts.tolist())) == 3
    cfg = DistillConfig(on_policy_fraction=1.0)
    a = on_policy_batch(student, b, cfg, micro_step=5, eos_ids=[])
    again = on_policy_batch(student, b, cfg, micro_step=5, eos_ids=[])
    assert torch.equal(a.input_ids, again.input_ids) and torch.equal(a.labels, again.labels)
    budget = int(learned.sum(1).max())
    for r, n in enumerate(starts.tolist()):
        assert torch.equal(a.input_ids[r, :n], b.input_ids[r, :n])  # the prompt, unchanged
        lab = a.labels[r]
        assert (lab[: n - 1] == IGNORE_INDEX).all()
        answer = lab[lab != IGNORE_INDEX]
        assert len(answer) == budget  # no end token here: the whole budget is sampled
        assert torch.equal(answer[:-1], a.input_ids[r, n : n + budget - 1])
        assert int(a.attention_mask[r].sum()) == n + budget - 1
    # an end token stops a row's answer; what follows is padding without loss
    eos = int(a.labels[0, starts[0] - 1])
    e = on_policy_batch(student, b, cfg, micro_step=5, eos_ids=[eos])
    lab0 = e.labels[0][e.labels[0] != IGNORE_INDEX]
    assert lab0.tolist() == [eos] and int(e.attention_mask[0].sum()) == int(starts[0])


def test_on_policy_refuses_an_offline_cache_and_a_missing_teacher(models, tmp_path):
    _teacher, student = models
    cfg = DistillConfig(on_policy_fraction=1.0, on_policy_prompt_tokens=4, steps=1)
    b = Batch.from_blocks(_blocks())
    b.teacher_topk_ids = torch.zeros(*b.input_ids.shape, 2, dtype=torch.long)
    b.teacher_topk_logprobs = torch.full((*b.input_ids.shape, 2), -1.0)
    with pytest.raises(UserError, match="offline teacher cache"):
        on_policy_batch(student, b, cfg, 0)
    with pytest.raises(UserError, match="needs the online teacher"):
        loop.distill(None, student, lambda m: b, [b], cfg, tmp_path, progress=False)


def test_mixed_on_policy_training_is_reproducible(models, tiny_dir, tmp_path):
    teacher, _ = models
    blocks = _blocks(8, 17)
    cfg = DistillConfig(
        steps=3,
        batch_size=2,
        lr=1e-3,
        warmup_steps=1,
        checkpoint_every=100,
        on_policy_fraction=0.5,
        on_policy_prompt_tokens=8,
        seed=2,
    )
    assert 0 < sum(is_on_policy(cfg, m) for m in range(32)) < 32
    assert len({is_on_policy(cfg, m) for m in range(3)}) == 2  # these 3 steps mix on-policy and data batches
    states = []
    for run in ("a", "b"):
        student = load_model(str(tiny_dir)).model
        loop.distill(
            teacher, student, loop.packed_batches(blocks, 2, 0), blocks[:2], cfg, tmp_path / run, progress=False
        )
        states.append(student.state_dict())
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k])
