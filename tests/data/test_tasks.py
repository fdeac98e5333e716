"""Task files: validated line by line, split by seed and stratified by bucket, eval never trained on."""

import json
import logging

import pytest

from toolchain.config import from_dict
from toolchain.data.graders import GraderConfig
from toolchain.data.tasks import read_task, split_task, stratified_cap
from toolchain.errors import UserError

LABELS = GraderConfig(kind="label", labels=["spam", "ham"])


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def rows(n_per_bucket=(40, 20, 6)):
    out = []
    for b, n in zip(("easy", "hard", "rare"), n_per_bucket):
        for i in range(n):
            label = "spam" if i % 2 else "ham"
            out.append({"prompt": f"{b} email {i}", "response": label, "bucket": b})
    return out


def test_split_is_stratified_seeded_and_disjoint(tmp_path):
    ex = read_task(write(tmp_path / "t.jsonl", rows()), LABELS)
    s = split_task(ex, eval_fraction=0.25, calib_fraction=0.05, seed=3, min_eval_per_bucket=1)
    by = {b: [e for e in s.eval if e.bucket == b] for b in ("easy", "hard", "rare")}
    assert {b: len(v) for b, v in by.items()} == {"easy": 10, "hard": 5, "rare": 2}
    lines = lambda xs: {e.line for e in xs}
    assert lines(s.eval).isdisjoint(lines(s.train)) and lines(s.calib).isdisjoint(lines(s.train))
    assert lines(s.eval).isdisjoint(lines(s.calib))
    assert len(s.train) + len(s.calib) + len(s.eval) == 66
    again = split_task(ex, eval_fraction=0.25, calib_fraction=0.05, seed=3, min_eval_per_bucket=1)
    assert [e.line for e in again.eval] == [e.line for e in s.eval]
    other = split_task(ex, eval_fraction=0.25, calib_fraction=0.05, seed=4, min_eval_per_bucket=1)
    assert [e.line for e in other.eval] != [e.line for e in s.eval]


def test_a_bucket_with_few_eval_examples_is_warned_about(tmp_path, caplog):
    ex = read_task(write(tmp_path / "t.jsonl", rows()), LABELS)
    with caplog.at_level(logging.WARNING):
        split_task(ex, eval_fraction=0.25, calib_fraction=0.05, seed=0, min_eval_per_bucket=5)
    assert "bucket 'rare': 2 eval example(s) of 6 (fewer than 5)" in caplog.text
    assert "'easy'" not in caplog.text


def test_stratified_cap_keeps_every_bucket(tmp_path):
    ex = read_task(write(tmp_path / "t.jsonl", rows()), LABELS)
    capped = stratified_cap(ex, 11)
    assert {e.bucket for e in capped} == {"easy", "hard", "rare"} and len(capped) <= 11


@pytest.mark.parametrize(
    "line,msg",
    [
        ('{"prompt": "x"}', r"t.jsonl:2: missing key 'response'"),
        ('{"prompt": "x", "response": "spam", "bucket": 3}', r"t.jsonl:2: 'bucket' must be a non-empty string"),
        ('{"prompt": "x", "response": "  "}', r"t.jsonl:2: the response is empty"),
        ('{"prompt": "x", "response": "maybe"}', r"t.jsonl:2: gold answer 'maybe' is none of the labels"),
        ('{"prompt": "x", "response": "spam"', r"t.jsonl:2: malformed JSON"),
    ],
)
def test_bad_lines_are_refused_with_their_line_number(tmp_path, line, msg):
    path = write(tmp_path / "t.jsonl", ['{"prompt": "ok", "response": "ham"}', line])
    with pytest.raises(UserError, match=msg):
        read_task(path, LABELS)


def test_answer_field_is_graded_instead_of_the_response(tmp_path):
    path = write(tmp_path / "t.jsonl", [{"prompt": "2+2?", "response": "It is four (4).", "answer": 4}])
    (ex,) = read_task(path, GraderConfig(kind="number"))
    assert ex.answer == "4" and ex.bucket == "all"


def test_task_config_reads_the_file_when_it_loads(tmp_path):
    path = write(tmp_path / "t.jsonl", rows())
    grader = {"kind": "label", "labels": ["spam", "ham"]}
    cfg = from_dict({"task": {"path": str(path), "grader": grader, "min_eval_per_bucket": 1}})
    assert len(cfg.task.splits().eval) == 8 + 4 + 1  # 20% of each bucket
    with pytest.raises(UserError, match="unknown grader 'fuzzy'"):
        from_dict({"task": {"path": str(path), "grader": {"kind": "fuzzy"}}})
    with pytest.raises(UserError, match="bucket_graders names bucket 'nope'"):
        from_dict({"task": {"path": str(path), "grader": grader, "bucket_graders": {"nope": {"kind": "exact"}}}})
    with pytest.raises(UserError, match="task.path: file not found"):
        from_dict({"task": {"path": str(tmp_path / "missing.jsonl")}})
