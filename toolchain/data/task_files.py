"""Read the JSONL / text files a config names, with errors that give the file and line.

Pairs: one JSON object a line, `{"prompt": ..., "response": ...}` or chat format
`{"messages": [{"role": ..., "content": ...}, ...]}` whose last message is the assistant's
answer. Prompts: a .txt file (one a line) or a .jsonl of `{"prompt": ...}`. No torch here: the
config validation reads these files before any stage spends time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from toolchain.errors import UserError

_ROLES = ("system", "user", "assistant")


# ---------------------------------------------------------------------------- reading JSONL


def messages_from(obj, where: str) -> list[dict]:
    """The chat of one JSONL object: its `messages`, or its `prompt` and `response` as two turns."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2:
            raise UserError(f"{where}: 'messages' must be a list of at least two messages (a prompt and the answer)")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in _ROLES:
                raise UserError(
                    f'{where}: messages[{j}] must be {{"role": one of {"/".join(_ROLES)}, '
                    f'"content": a string}}, got {json.dumps(m)[:80]}'
                )
        if msgs[-1]["role"] != "assistant":
            raise UserError(
                f"{where}: the last message must be the assistant's answer (role 'assistant'), "
                f"got role '{msgs[-1]['role']}'"
            )
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    missing = [k for k in ("prompt", "response") if k not in obj]
    if missing:
        raise UserError(
            f'{where}: missing key \'{missing[0]}\'; each line needs "prompt" and "response" '
            f'(or "messages"), found keys: {", ".join(obj) or "none"}'
        )
    for k in ("prompt", "response"):
        if not isinstance(obj[k], str):
            raise UserError(f"{where}: '{k}' must be a string, got {type(obj[k]).__name__}")
    return [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["response"]}]


def read_jsonl_objects(path: str | os.PathLike, what: str = "sequence data file") -> list[tuple[int, object]]:
    """(line number, parsed JSON) for every non-blank line of a UTF-8 JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        bad_line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise UserError(
            f"{path}:{bad_line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); save the file as UTF-8"
        ) from None
    out = []
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((no, json.loads(line)))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{no}: malformed JSON ({e.msg} at column {e.colno})") from None
    return out


def read_pairs(path: str | os.PathLike) -> list[list[dict]]:
    """Read a JSONL of prompt/response pairs (or chat messages) into chat message lists."""
    examples = [messages_from(obj, f"{path}:{no}") for no, obj in read_jsonl_objects(path)]
    if not examples:
        raise UserError(f'{path} holds no examples; it needs one JSON object per line with "prompt" and "response"')
    return examples


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts for teacher generation: a .jsonl with {"prompt": ...} lines, or plain text, one a line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save the file as UTF-8") from None
    prompts = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{no}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise UserError(f'{path}:{no}: expected {{"prompt": "..."}}')
            prompts.append(obj["prompt"])
        else:
            prompts.append(line)
    if not prompts:
        raise UserError(f"{path} holds no prompts")
    return prompts


# ---------------------------------------------------------------------------- teacher generations
