"""Each data mode on tiny models: prepare the batches, train a few steps through the real loop."""

import json

import pytest
import torch

from toolchain.config import DataConfig, DistillConfig, TeacherConfig, from_dict
from toolchain.distill.evaluate import evaluate
from toolchain.distill.loop import distill
from toolchain.distill.modes import loaded_teacher_id, prepare_data, teacher_id_for
from toolchain.errors import UserError
from toolchain.models.load import load_model


@pytest.fixture(scope="module")
def teacher(tiny_dir_6):
    return load_model(str(tiny_dir_6))


def _noisy_copy(teacher, seed=0):
    """A student with a clear signal to learn: the teacher with its block weights perturbed."""
    from transformers import AutoModelForCausalLM

    s = AutoModelForCausalLM.from_pretrained(teacher.path)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in s.named_parameters():
            if "layers" in name and p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return s


DATA = dict(seq_len=32, eval_sequences=4, max_train_blocks=16)
CFG = DistillConfig(steps=8, batch_size=2, lr=3e-3, warmup_steps=1, alpha=0.0, temperature=1.0, checkpoint_every=100)


def test_cache_mode_trains_without_the_teacher(teacher, tmp_path):
    tcfg = TeacherConfig(model=str(teacher.path))
    assert teacher_id_for(tcfg) == loaded_teacher_id(teacher)  # config and loaded teacher agree
    data = DataConfig(mode="cache", cache_k=32, **DATA)
    student = _noisy_copy(teacher)
    plan = prepare_data(data, CFG, student, teacher.tokenizer, tmp_path, teacher=teacher, teacher_cfg=tcfg)
    assert not plan.needs_teacher and plan.info["cache_bytes_per_token"] < 4 * 32 + 2 + 8
    assert plan.batch_fn(0).teacher_topk_ids.shape[-1] == 32
    before = evaluate(student, teacher.model, _held(teacher))
    res = distill(None, student, plan.batch_fn, plan.heldout, CFG, tmp_path / "w", progress=False)
    after = evaluate(student, teacher.model, _held(teacher))
    assert after["kl"] < 0.95 * before["kl"]  # measured against the full, dense teacher
    assert res["after"]["kl"] < res["before"]["kl"]  # the loop's own held-out figures (sparse, from the cache)

    # a second run finds the cache and never needs the teacher: a loader that fails proves it
    def no_teacher():
        raise AssertionError("teacher loaded although the cache is complete")

    plan2 = prepare_data(data, CFG, student, teacher.tokenizer, tmp_path, teacher=no_teacher, teacher_cfg=tcfg)
    assert torch.equal(plan2.batch_fn(3).teacher_topk_logprobs, plan.batch_fn(3).teacher_topk_logprobs)
    # another teacher (here: the same files loaded in 8-bit) is refused with the reason
    with pytest.raises(UserError, match="made with another teacher"):
        prepare_data(
            data,
            CFG,
            student,
            teacher.tokenizer,
            tmp_path,
            teacher=no_teacher,
            teacher_cfg=TeacherConfig(model=str(teacher.path), quantize="8bit"),
        )
    # other data too
    with pytest.raises(UserError, match="other training text"):
        prepare_data(
            DataConfig(mode="cache", cache_k=32, seed=1, **DATA),
            CFG,
            student,
            teacher.tokenizer,
            tmp_path,
            teacher=no_teacher,
            teacher_cfg=tcfg,
        )


def _held(teacher):
    from toolchain.data.corpus import train_and_heldout

    return train_and_heldout(teacher.tokenizer, "pydoc", 33, 0.1, 0, 4)[1]


def test_sequences_mode_from_pairs_learns_the_responses(teacher, tmp_path):
    pairs = tmp_path / "traffic.jsonl"
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(6)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DataConfig(mode="sequences", pairs=str(pairs), heldout_fraction=0.3, seq_len=64)
    student = _noisy_copy(teacher)
    plan = prepare_data(data, CFG, student, teacher.tokenizer, tmp_path, teacher=None)
    assert plan.info["train_examples"] == 4 and plan.info["heldout_examples"] == 2 and not plan.needs_teacher
    cfg = DistillConfig(
        steps=6, batch_size=2, lr=1e-2, warmup_steps=1, alpha=0.0, temperature=1.0, checkpoint_every=100
    )
    res = distill(None, student, plan.batch_fn, plan.heldout, cfg, tmp_path / "w", progress=False)
    # one-hot response targets: the held-out "KL" is the CE of the responses, and it falls
    assert res["after"]["kl"] == pytest.approx(res["after"]["ce"], rel=1e-3)
    assert res["after"]["ce"] < res["before"]["ce"]


def test_sequences_mode_from_teacher_generations(teacher, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say hi.\nName a colour.\nCount to two.\n")
    data = DataConfig(mode="sequences", prompts=str(prompts), gen_max_new_tokens=6, seq_len=64, heldout_fraction=0.3)
    plan = prepare_data(data, CFG, None, teacher.tokenizer, tmp_path, teacher=lambda: teacher)
    assert (tmp_path / "generations.jsonl").is_file() and plan.info["train_examples"] == 2
    b = plan.batch_fn(0)
    assert b.attention_mask is not None and b.n_loss_tokens > 0


def test_text_mode_refuses_a_foreign_tokenizer(teacher, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher.path)
    tok.add_tokens(["<brand-new-token>"])
    with pytest.raises(UserError, match="logit KD needs a shared tokenizer.*data.mode: sequences"):
        prepare_data(DataConfig(**DATA), CFG, teacher.model, tok, tmp_path, teacher=teacher)


def test_data_mode_config_checks(tmp_path):
    with pytest.raises(UserError, match="data.mode: 'logits' is not one of text, cache, sequences"):
        from_dict({"data": {"mode": "logits"}})
    with pytest.raises(UserError, match="needs data.pairs"):
        from_dict({"data": {"mode": "sequences"}})
    with pytest.raises(UserError, match="data.pairs: file not found"):
        from_dict({"data": {"mode": "sequences", "pairs": str(tmp_path / "none.jsonl")}})
    assert from_dict({"data": {"mode": "cache", "cache_k": 16}}).data.cache_k == 16


def test_distill_cache_cli_builds_and_refuses_other_settings(tiny_dir_6, tmp_path, capsys):
    from toolchain.cli import main

    args = [
        "distill-cache",
        "--teacher",
        str(tiny_dir_6),
        "--out",
        str(tmp_path / "c"),
        "--no-progress",
        "--set",
        "data.seq_len=32",
        "--set",
        "data.max_train_blocks=6",
        "--set",
        "data.eval_sequences=2",
    ]
    assert main(args + ["--k", "8"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cache_k"] == 8 and info["train_blocks"] == 6 and (tmp_path / "c" / "train" / "manifest.json").is_file()
    assert main(args + ["--k", "16"]) == 2
    assert "stores another top-k" in capsys.readouterr().err


def _task_file(tmp_path, n=24):
    rows = []
    for i in range(n):
        label = "spam" if i % 2 else "ham"
        rows.append({"prompt": f"Is this spam? message {i}", "response": label, "bucket": label})
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("targets,logits", [("gold", False), ("teacher", True), ("teacher", False)])
def test_task_mode_trains_on_the_train_split_only(tiny_dir, tiny_dir_6, tmp_path, targets, logits):
    from toolchain.distill.modes import prepare_data
    from toolchain.models.load import load_model

    grader = {"kind": "label", "labels": ["spam", "ham"]}
    cfg = from_dict(
        {
            "task": {"path": str(_task_file(tmp_path)), "grader": grader, "min_eval_per_bucket": 1},
            "data": {"mode": "task", "task_targets": targets, "teacher_logits": logits, "gen_temperature": 0},
            "distill": {"batch_size": 2},
        }
    )
    teacher, student = load_model(str(tiny_dir_6)), load_model(str(tiny_dir))
    plan = prepare_data(
        cfg.data, cfg.distill, student.model, student.tokenizer, tmp_path, teacher=teacher, task=cfg.task
    )
    splits = cfg.task.splits()
    assert plan.info["train_examples"] == len(splits.train) and plan.info["heldout_examples"] == len(splits.calib)
    assert plan.needs_teacher is (targets == "teacher" and logits)
    batch = plan.batch_fn(0)
    assert (batch.teacher_topk_ids is None) is plan.needs_teacher  # white-box: logits from the teacher online
    if targets == "teacher":  # the teacher's greedy answers to the train prompts, not the gold ones
        gen = [json.loads(line) for line in (tmp_path / "task-generations.jsonl").read_text().splitlines()]
        train_prompts = {e.prompt[0]["content"] for e in splits.train}
        assert {g["prompt"] for g in gen} == train_prompts
        eval_prompts = {e.prompt[0]["content"] for e in splits.eval}
        assert not train_prompts & eval_prompts


def test_task_mode_needs_a_task():
    with pytest.raises(UserError, match="data.mode: task trains on the task's examples: set task.path"):
        from_dict({"data": {"mode": "task"}})
