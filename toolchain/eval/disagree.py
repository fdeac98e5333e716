"""`toolchain disagree`: where the student and its teacher answer differently, most telling first.

Both models answer the same unlabelled prompts (greedy, each in the runtime that ships it). A
prompt ranks higher when the answers differ (after normalising case and spaces), then when the
student was less sure of its answer (its lowest answer-token probability, for a GGUF student).
The top rows are written as task examples whose answer is the teacher's, so they can be reviewed
and added to the next distillation (`task.extra_train`).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from toolchain.errors import UserError
from toolchain.formats import Artifact


def read_chats(path: str | os.PathLike) -> list[list[dict]]:
    """Prompts as chats: a task JSONL ("messages" without its answer, or "prompt"), or one prompt per text line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompts file not found: {p}")
    chats = []
    for no, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if not line.lstrip().startswith("{"):
            chats.append([{"role": "user", "content": line.strip()}])
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{p}:{no}: not valid JSON ({e.msg})") from None
        if isinstance(obj.get("messages"), list) and obj["messages"]:
            msgs = obj["messages"]
            chats.append(msgs[:-1] if msgs[-1].get("role") == "assistant" else msgs)
        elif isinstance(obj.get("prompt"), str):
            chats.append([{"role": "user", "content": obj["prompt"]}])
        else:
            raise UserError(f'{p}:{no}: needs "prompt" or "messages"')
    if not chats:
        raise UserError(f"{p} holds no prompts")
    return chats


def answers(model: Artifact, chats: list[list[dict]], tokenizer_dir, max_new: int, with_confidence: bool = False):
    """(answers, confidences or None): greedy, in the model's own runtime."""
    from transformers import AutoTokenizer

    from toolchain.data.chat_encoding import prompt_token_ids, stop_token_ids
    from toolchain.eval import generate as G
    from toolchain.eval.run import runtime_answers
    from toolchain.runtime.confidence import answer_confidence

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    stops = stop_token_ids(tok, tokenizer_dir)
    prompts = [prompt_token_ids(tok, c) for c in chats]
    if with_confidence and model["format"] == "gguf":
        stats: list = []
        raw = G.llama_generate(model["path"], prompts, max_new, stops, stats=stats)
        conf = [answer_confidence(s, stops, t, 1.0) for s, t in zip(stats, raw)]
    else:
        raw, conf = runtime_answers(model, prompts, max_new, stops), None
    return [G.decode_answer(tok, ids, stops) for ids in raw], conf


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def rank(chats, student: list[str], teacher: list[str], confidence: list[float] | None) -> list[dict]:
    """Rows, most telling disagreement first (seeded order among equals is the input order)."""
    rows = []
    for i, (c, s, t) in enumerate(zip(chats, student, teacher)):
        rows.append({
            "index": i,
            "messages": [*c, {"role": "assistant", "content": t}],
            "student": s,
            "teacher": t,
            "disagree": _norm(s) != _norm(t),
            "student_confidence": None if confidence is None else confidence[i],
        })  # fmt: skip
    return sorted(rows, key=lambda r: (not r["disagree"], r["student_confidence"] or 0.0, r["index"]))


def random_rows(rows: list[dict], n: int, seed: int = 0) -> list[dict]:
    return random.Random(seed).sample(rows, min(n, len(rows)))
