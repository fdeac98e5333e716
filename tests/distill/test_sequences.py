import json

import pytest
import torch

from toolchain.data.batch_order import batch_indices
from toolchain.distill import sequences as S
from toolchain.distill.batch import IGNORE_INDEX
from toolchain.errors import UserError
from toolchain.models.load import load_model


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(str(tiny_dir))


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_both_formats_read_to_the_same_messages(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"prompt": "What is 2+2?", "response": "4"}, ""])
    b = _jsonl(
        tmp_path / "b.jsonl",
        [{"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}],
    )
    assert (
        S.read_pairs(a)
        == S.read_pairs(b)
        == [[{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]]
    )


@pytest.mark.parametrize(
    "rows, match",
    [
        ([], "holds no examples"),
        ([{"prompt": "a", "response": "b"}, '{"prompt": "a", "response": '], r"bad\.jsonl:2: malformed JSON"),
        (
            [{"prompt": "a", "response": "b"}, {"prompt": "a", "answer": "b"}],
            r":2: missing key 'response'.*found keys: prompt, answer",
        ),
        ([{"prompt": "a", "response": 3}], r":1: 'response' must be a string"),
        (
            [{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}],
            r":1: the last message must be the assistant",
        ),
        (
            [{"messages": [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "b"}]}],
            r":1: messages\[0\] must be",
        ),
        (["[1, 2]"], r":1: expected a JSON object"),
    ],
)
def test_bad_files_name_the_line_and_the_problem(tmp_path, rows, match):
    with pytest.raises(UserError, match=match):
        S.read_pairs(_jsonl(tmp_path / "bad.jsonl", rows))


def test_non_utf8_and_missing_file(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"prompt": "ok", "response": "ok"}\n{"prompt": "caf\xe9", "response": "x"}\n')
    with pytest.raises(UserError, match=r"latin1\.jsonl:2: not UTF-8"):
        S.read_pairs(p)
    with pytest.raises(UserError, match="not found"):
        S.read_pairs(tmp_path / "nope.jsonl")


def test_labels_cover_exactly_the_answer_tokens(tiny):
    tok = tiny.tokenizer
    msgs = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue, like the sky."}]
    enc = S.encode_pairs(tok, [msgs, [msgs[0], {"role": "assistant", "content": "Red."}]], seq_len=64)
    assert enc.input_ids.shape == enc.labels.shape == enc.attention_mask.shape == (2, 64)
    row, lab, mask = enc.input_ids[0], enc.labels[0], enc.attention_mask[0]
    n = int(mask.sum())
    assert mask[:n].all() and not mask[n:].any()  # right padding
    assert (lab[n:] == IGNORE_INDEX).all()
    # the learned targets decode to the answer followed by the end-of-turn token
    learned = lab[lab != IGNORE_INDEX].tolist()
    assert tok.decode(learned) == "Blue, like the sky.<|im_end|>"
    # labels are shifted inputs where they apply
    where = (lab != IGNORE_INDEX).nonzero().flatten()
    assert torch.equal(lab[where[:-1]], row[where[:-1] + 1])
    # the prompt (system + user turn + assistant header) is never a target
    prompt_text = tok.decode(row[: int(where[0]) + 1])
    assert prompt_text.endswith("<|im_start|>assistant\n") and "Name a colour." in prompt_text


def test_truncation_dropping_and_all_too_long(tiny):
    tok = tiny.tokenizer
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "word " * 200}]
    long_prompt = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    enc = S.encode_pairs(tok, [short, long_prompt], seq_len=48)
    assert len(enc) == 1 and enc.dropped == 1 and enc.truncated == 1
    assert enc.attention_mask.all() and (enc.labels != IGNORE_INDEX).sum() > 0
    with pytest.raises(UserError, match=r"all 1 examples are longer than data.seq_len=48.*longest prompt"):
        S.encode_pairs(tok, [long_prompt], seq_len=48)


def test_batch_fn_yields_batches_in_loop_order(tiny):
    msgs = [[{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}] for i in range(5)]
    enc = S.encode_pairs(tiny.tokenizer, msgs, seq_len=40)
    fn = S.sequence_batch_fn(enc, batch_size=2, seed=0)
    b = fn(1)

    idx = batch_indices(1, 2, 5, 0)
    width = int(enc.attention_mask[idx].sum(1).max())
    assert b.input_ids.shape[1] == width < 40  # cut to the longest real row
    assert torch.equal(b.input_ids, enc.input_ids[idx, :width])
    assert torch.equal(b.attention_mask, enc.attention_mask[idx, :width])
    assert b.n_loss_tokens == int((enc.labels[idx] != IGNORE_INDEX).sum()) > 0
    with pytest.raises(UserError, match="only 5 usable examples"):
        S.sequence_batch_fn(enc, batch_size=8, seed=0)


def test_cut_padding_changes_no_real_position(tiny):
    """Batches drop the right padding past their longest row: the logits at every real
    position are those of the full seq_len row."""
    msgs = [[{"role": "user", "content": "Q" * (i + 1)}, {"role": "assistant", "content": f"A{i}"}] for i in range(3)]
    enc = S.encode_pairs(tiny.tokenizer, msgs, seq_len=64)
    b = enc.batch([0, 2], one_hot_targets=False)
    assert b.input_ids.shape[1] < 64
    with torch.no_grad():
        full = tiny.model(input_ids=enc.input_ids[[0, 2]], attention_mask=enc.attention_mask[[0, 2]]).logits
        cut = tiny.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    real = b.attention_mask.bool()
    torch.testing.assert_close(cut[real], full[:, : b.input_ids.shape[1]][real], rtol=1e-5, atol=1e-5)


def test_teacher_generations_are_seeded_and_cached(tiny, tmp_path):
    out = tmp_path / "gen.jsonl"
    prompts = ["Say hi.", "Count to three.", "Name a fruit."]
    a = S.generate_pairs(tiny.model, tiny.tokenizer, prompts, out, "tid", max_new_tokens=8, seed=3, batch_size=2)
    assert [m[0]["content"] for m in a] == prompts and all(m[1]["role"] == "assistant" for m in a)
    assert S.read_pairs(out) == a  # readable as a user's pairs file
    mtime = out.stat().st_mtime_ns
    assert (
        S.generate_pairs(tiny.model, tiny.tokenizer, prompts, out, "tid", max_new_tokens=8, seed=3, batch_size=2) == a
    )
    assert out.stat().st_mtime_ns == mtime  # made once
    b = S.generate_pairs(
        tiny.model, tiny.tokenizer, prompts, tmp_path / "g2.jsonl", "tid", max_new_tokens=8, seed=3, batch_size=2
    )
    assert a == b  # same seed, same samples
    c = S.generate_pairs(tiny.model, tiny.tokenizer, prompts, out, "tid", max_new_tokens=8, seed=4, batch_size=2)
    assert c != a and out.stat().st_mtime_ns != mtime  # other settings regenerate


def test_read_prompts(tmp_path):
    assert S.read_prompts(_jsonl(tmp_path / "p.txt", ["one", "", "two"])) == ["one", "two"]
    assert S.read_prompts(_jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}])) == ["x"]
    with pytest.raises(UserError, match=r"p2\.jsonl:1"):
        S.read_prompts(_jsonl(tmp_path / "p2.jsonl", [{"q": "x"}]))


def test_head_over_answer_rows_only_gives_the_same_loss_and_gradient(tiny, tiny_dir_6, monkeypatch):
    """The output layer runs only where a label is; the loss and its gradient are those of every row."""
    from toolchain.distill import loop
    from toolchain.distill.losses import LossSpec

    teacher = load_model(str(tiny_dir_6)).model
    examples = [
        [{"role": "user", "content": f"Question number {i} about lists?"}, {"role": "assistant", "content": "yes"}]
        for i in range(4)
    ]
    batch = S.encode_pairs(tiny.tokenizer, examples, 64).batch(range(4), one_hot_targets=False)
    spec = LossSpec(alpha=0.5, temperature=2.0)
    denom = float((batch.labels != IGNORE_INDEX).sum())

    def loss_and_grad():
        tiny.model.zero_grad()
        loss, _, _ = loop.batch_loss(tiny.model, teacher, batch, spec, denom)
        loss.backward()
        return loss.detach(), tiny.model.model.layers[0].mlp.down_proj.weight.grad.clone()

    only_answers = loss_and_grad()
    monkeypatch.setattr(loop, "_scored_rows", lambda s_h, target, labels: (s_h, target, labels))
    every_row = loss_and_grad()
    torch.testing.assert_close(only_answers[0], every_row[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(only_answers[1], every_row[1], rtol=1e-4, atol=1e-7)
