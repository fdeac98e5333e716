"""`toolchain disagree`: both models answer, disagreements rank first, the rows train the next round."""

import json

import pytest

from toolchain.cli import main
from toolchain.config import TaskConfig
from toolchain.data.graders import GraderConfig
from toolchain.errors import UserError
from toolchain.eval.disagree import rank, read_chats


def test_rank_puts_disagreements_first_least_sure_first():
    chats = [[{"role": "user", "content": str(i)}] for i in range(4)]
    rows = rank(chats, ["spam", "Ham", "spam", "ham"], ["spam", "ham ", "ham", "spam"], [0.9, 0.2, 0.8, 0.3])
    assert [r["index"] for r in rows] == [3, 2, 1, 0]
    assert [r["disagree"] for r in rows] == [True, True, False, False]
    assert rows[0]["messages"][-1] == {"role": "assistant", "content": "spam"}  # the teacher's answer


def test_read_chats_takes_task_lines_prompts_and_text(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}]}) + "\n"
        + json.dumps({"prompt": "b"}) + "\n\nplain text line\n"
    )  # fmt: skip
    assert [c[-1]["content"] for c in read_chats(p)] == ["a", "b", "plain text line"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": 1}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:1"):
        read_chats(bad)


def test_cli_writes_rows_that_train_the_next_round(tiny_dir, tiny_dir_6, tmp_path, capsys):
    rows = [{"prompt": f"Is message {i} spam?", "response": "spam" if i % 2 else "ham"} for i in range(30)]
    task_file = tmp_path / "task.jsonl"
    task_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = TaskConfig(path=str(task_file), grader=GraderConfig(kind="contains"), min_eval_per_bucket=1)
    splits = task.splits()
    unlabelled = tmp_path / "new.txt"
    unlabelled.write_text("".join(f"Is new message {i} spam?\n" for i in range(6)))
    out = tmp_path / "top.jsonl"
    args = ["disagree", "--teacher", str(tiny_dir_6), "--student", str(tiny_dir), "--prompts", str(unlabelled)]
    assert main([*args, "--out", str(out), "--top", "4", "--max-new-tokens", "4"]) == 0
    assert "top 4 written" in capsys.readouterr().out
    top = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(top) == 4 and all(r["messages"][-1]["content"] == r["teacher"] for r in top)
    flags = [r["disagree"] for r in top]
    assert flags == sorted(flags, reverse=True)
    # the rows are task examples: added to the train split only
    more = TaskConfig(**{**task.__dict__, "extra_train": str(out)}).splits()
    assert len(more.train) == len(splits.train) + 4 and more.eval == splits.eval
    # a row whose prompt is held out for eval would leak it into training
    leak = tmp_path / "leak.jsonl"
    leak.write_text(json.dumps({"messages": [*splits.eval[0].prompt, {"role": "assistant", "content": "ham"}]}) + "\n")
    with pytest.raises(UserError, match="eval or calibration split"):
        TaskConfig(**{**task.__dict__, "extra_train": str(leak)}).splits()
    assert main([*args[:-1], str(tmp_path / "missing.txt"), "--out", str(out)]) == 2
