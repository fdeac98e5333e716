"""Task eval through every runtime: the same prompts give the same answers in torch, llama.cpp and onnxruntime."""

import pytest

from toolchain.config import TaskConfig
from toolchain.data.graders import GraderConfig
from toolchain.data.tasks import TaskExample
from toolchain.eval.run import evaluate_model
from toolchain.eval.score import format_table, retention, score
from toolchain.models.artifacts import describe_model

PROMPTS = [
    ("facts", "What is the capital of France?"),
    ("facts", "Name a prime number."),
    ("code", "Write a Python list comprehension."),
    ("code", "What does len() return?"),
    ("chat", "Hello! How are you today?"),
    ("chat", "Tell me a joke."),
]


def examples(answers=None):
    answers = answers or ["x"] * len(PROMPTS)
    return [
        TaskExample(
            messages=[{"role": "user", "content": p}, {"role": "assistant", "content": a}], bucket=b, answer=a, line=i
        )
        for i, ((b, p), a) in enumerate(zip(PROMPTS, answers), 1)
    ]


@pytest.fixture(scope="module")
def torch_answers(tiny_dir):
    task = TaskConfig(max_new_tokens=8)
    return evaluate_model(describe_model(tiny_dir), examples(), task)["answers"]


def test_gguf_and_onnx_answer_as_torch_does(tiny_dir, tiny_onnx, torch_answers, tmp_path):
    from toolchain.export.gguf import export_gguf

    assert all(torch_answers) and len(set(torch_answers)) > 1  # a real, varied answer to each prompt
    # torch's own answers as the gold: accuracy through another runtime is agreement with torch
    task = TaskConfig(grader=GraderConfig(kind="exact"), max_new_tokens=8)
    ex = examples(torch_answers)
    (gguf,) = export_gguf(tiny_dir, tmp_path, ["F32"])
    results = {
        "torch": evaluate_model(describe_model(tiny_dir), ex, task),
        "gguf F32": evaluate_model(gguf, ex, task, tokenizer_dir=tiny_dir),
        "onnx fp32": evaluate_model(describe_model(tiny_onnx[1]), ex, task),
    }
    for name, r in results.items():
        assert r["answers"] == torch_answers, name
        assert r["score"]["macro"] == 1.0 and set(r["score"]["buckets"]) == {"facts", "code", "chat"}
    table = format_table({k: v["score"] for k, v in results.items()})
    assert "gguf F32" in table and "100.0%" in table


def test_gguf_needs_a_tokenizer_directory(tiny_dir, tmp_path):
    from toolchain.errors import UserError
    from toolchain.export.gguf import export_gguf

    (gguf,) = export_gguf(tiny_dir, tmp_path, ["Q8_0"])
    with pytest.raises(UserError, match="pass it with --tokenizer"):
        evaluate_model(gguf, examples(), TaskConfig())


def test_scores_are_per_bucket_macro_and_micro():
    ex = examples(["a", "b", "c", "d", "e", "f"])
    s, right = score(ex, ["a", "b", "c", "no", "no", "no"], GraderConfig(kind="exact"))
    assert right == [True, True, True, False, False, False]
    assert {b: v["accuracy"] for b, v in s.buckets.items()} == {"chat": 0.0, "code": 0.5, "facts": 1.0}
    assert s.micro == 0.5 and s.macro == pytest.approx(0.5)
    teacher, _ = score(ex, ["a", "b", "c", "d", "e", "no"], GraderConfig(kind="exact"))
    r = retention(s.as_dict(), teacher.as_dict())
    assert r["buckets"] == {"chat": 0.0, "code": 0.5, "facts": 1.0}
    assert r["min_bucket"] == 0.0 and r["macro"] == pytest.approx(0.5 / (2.5 / 3))
    # a bucket the teacher never gets right has no retention, not an infinite one
    none_right, _ = score(ex, ["no"] * 6, GraderConfig(kind="exact"))
    assert retention(s.as_dict(), none_right.as_dict())["buckets"]["facts"] is None
