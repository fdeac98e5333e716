"""Fine-tuning the teacher on a task: answer-only loss, LoRA / QLoRA / full, merged, resumable."""

import pytest
import torch

from toolchain.config import FinetuneConfig, LoraConfig, TeacherConfig
from toolchain.data.tasks import TaskExample
from toolchain.finetune.run import collate, encode_task, finetune_teacher
from toolchain.formats import IGNORE_INDEX
from toolchain.models.load import load_model

WORDS = {"spam": ["prize", "winner", "offer", "free", "cash"], "ham": ["meeting", "lunch", "report", "draft", "notes"]}


def task(n=40):
    out = []
    for i in range(n):
        label = "spam" if i % 2 else "ham"
        word = WORDS[label][i % 5]
        msgs = [
            {"role": "user", "content": f"Is this email spam or ham? {word} {i}"},
            {"role": "assistant", "content": label},
        ]
        out.append(TaskExample(messages=msgs, bucket=label, answer=label, line=i + 1))
    return out


def test_collate_puts_every_answer_at_the_end_with_labels_only_there(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    rows = encode_task(tok, task(4), seq_len=128)
    b = collate(rows, pad=0)
    for r, (ids, n) in enumerate(rows):
        answer = ids[n:]
        labels = [t for t in b["labels"][r].tolist() if t != IGNORE_INDEX]
        assert labels == answer  # the answer's tokens (and nothing of the prompt) carry the loss
        assert b["input_ids"][r, -1].item() == ids[-2]  # left-padded: the row ends where its answer ends
        real = b["attention_mask"][r].bool()
        assert b["position_ids"][r][real].tolist() == list(range(len(ids) - 1))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_finetune_learns_the_task_and_saves_a_merged_teacher(tiny_dir, tmp_path, method):
    cfg = FinetuneConfig(method=method, steps=30, batch_size=4, lr=1e-2, warmup_steps=2)
    cfg.lora = LoraConfig(r=8, alpha=16.0)
    res = finetune_teacher(TeacherConfig(model=str(tiny_dir)), task(), tmp_path / "ft", cfg, echo=lambda m: None)
    # a random 64-wide model: all weights learn the two labels fast; rank-8 adapters on its
    # projections more slowly (the tied embedding table they must point at stays random)
    assert res["loss_last10"] < (0.2 if method == "full" else 0.9) * res["loss_first10"], res
    tuned = load_model(str(tmp_path / "ft"))  # a plain HF directory: no peft needed to load it
    assert tuned.meta["finetuned"]["method"] == method and tuned.meta["finetuned"]["examples"] == 40
    base = load_model(str(tiny_dir)).model
    changed = [n for n, p in tuned.model.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed and (method == "full" or all("proj" in n for n in changed))


def test_qlora_trains_on_a_4bit_base_and_merges_into_the_full_precision_one(tiny_dir, tmp_path):
    cfg = FinetuneConfig(method="qlora", steps=12, batch_size=4, lr=1e-2, warmup_steps=1)
    cfg.lora = LoraConfig(r=8, alpha=16.0)
    res = finetune_teacher(TeacherConfig(model=str(tiny_dir)), task(), tmp_path / "ft", cfg, echo=lambda m: None)
    assert res["loss_last10"] < res["loss_first10"]
    tuned = load_model(str(tmp_path / "ft")).model
    assert all(p.dtype == torch.float32 for p in tuned.parameters())  # merged into the fp32 base, not nf4
    assert (tmp_path / "ft.work" / "adapter" / "adapter_config.json").is_file()


def test_a_stopped_finetune_resumes_to_the_same_weights(tiny_dir, tmp_path):
    cfg = FinetuneConfig(method="lora", steps=10, batch_size=4, lr=1e-2, warmup_steps=1, checkpoint_every=5)
    cfg.lora = LoraConfig(r=4, alpha=8.0)
    teacher = TeacherConfig(model=str(tiny_dir))
    finetune_teacher(teacher, task(), tmp_path / "whole", cfg, echo=lambda m: None)
    # a run stopped after its step-5 checkpoint: the state on disk is what a killed process leaves
    first = FinetuneConfig(**{**cfg.__dict__, "steps": 10})
    from toolchain.finetune import run as ft

    real_train = ft.answer_loss
    calls = {"n": 0}

    def stop_after_five(model, batch):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real_train(model, batch)

    ft.answer_loss = stop_after_five
    try:
        with pytest.raises(KeyboardInterrupt):
            finetune_teacher(teacher, task(), tmp_path / "resumed", first, echo=lambda m: None)
    finally:
        ft.answer_loss = real_train
    log = []
    finetune_teacher(teacher, task(), tmp_path / "resumed", first, echo=log.append)
    assert log and "step 10/10" in log[-1]
    a, b = load_model(str(tmp_path / "whole")).model, load_model(str(tmp_path / "resumed")).model
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)


def test_examples_longer_than_seq_len_are_refused_with_the_fix(tiny_dir):
    from transformers import AutoTokenizer

    from toolchain.errors import UserError

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    with pytest.raises(UserError, match=r"longer than finetune.seq_len=8 tokens \(shortest: \d+\); raise"):
        encode_task(tok, task(3), seq_len=8)
