"""The shipped example task: SpamAssassin emails (as the npm package lays them out) into a task JSONL that validates."""

import base64
import json
import sys
from pathlib import Path

from toolchain.config import load_config

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "tasks"))
import spam_assassin  # noqa: E402

PLAIN = "From: a@b.org\nSubject: Re: build fails\nContent-Type: text/plain\n\nThe  patch\nworks for me.\n"
HTML_B64 = (
    "From: x@y.com\nSubject: =?utf-8?q?WIN_=24100?=\nMIME-Version: 1.0\nContent-Type: text/html\n"
    "Content-Transfer-Encoding: base64\n\n"
    + base64.b64encode(b"<html><style>p{}</style><p>Claim your <b>prize</b> &amp; more</p></html>").decode()
    + "\n"
)
MULTI = (
    "From: m@n.net\nSubject: lunch\nMIME-Version: 1.0\nContent-Type: multipart/alternative; boundary=XX\n\n"
    "--XX\nContent-Type: text/plain\n\nSee you at noon.\n--XX\nContent-Type: text/html\n\n<p>See you</p>\n--XX--\n"
)


def fake_package(root: Path) -> Path:
    for g in spam_assassin.GROUPS:
        (root / "data" / g).mkdir(parents=True)
        for i, raw in enumerate([PLAIN, HTML_B64, MULTI, PLAIN]):
            (root / "data" / g / f"{i:05d}.json").write_text(json.dumps({"id": i, "group": g, "text": raw}))
    return root


def test_emails_become_examples_with_subject_body_label_and_group():
    ex = spam_assassin.example(HTML_B64, "spam-2", chars=360)
    assert ex["response"] == "spam" and ex["bucket"] == "spam-2"
    assert "Subject: WIN $100" in ex["prompt"] and "Claim your prize & more" in ex["prompt"]
    assert "<" not in ex["prompt"].split("Subject:")[1] and "p{}" not in ex["prompt"]
    multi = spam_assassin.example(MULTI, "easy-ham-1", chars=360)
    assert multi["response"] == "ham" and multi["prompt"].endswith("See you at noon.")  # text/plain preferred
    assert spam_assassin.example(PLAIN, "hard-ham-1", chars=10)["prompt"].endswith("The patch ...")


def test_the_example_config_validates_on_the_built_task(tmp_path):
    pkg = fake_package(tmp_path / "pkg")
    out = tmp_path / "task.jsonl"
    assert spam_assassin.main([str(pkg), str(out), "--per-group", "3"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 15 and {r["bucket"] for r in rows} == set(spam_assassin.GROUPS)
    cfg = load_config(ROOT / "examples" / "task-spam.yaml", [f"task.path={out}"])
    splits = cfg.task.splits()
    assert splits.buckets() == sorted(spam_assassin.GROUPS) and all(splits.eval) and cfg.data.mode == "task"
