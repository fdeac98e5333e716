"""Offline training text, split into train and held-out by document, then packed into blocks.

The default corpus is the stdlib's `pydoc_data.topics` (~465k characters of technical English,
present on every Python install, so no download). Splitting by topic, not by block, keeps
held-out text genuinely unseen.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from toolchain.errors import UserError


def load_documents(source: str) -> list[str]:
    if source == "pydoc":
        from pydoc_data.topics import topics

        # several topic keys share one text; keep each text once so held-out text never leaks
        return list(dict.fromkeys(topics[k] for k in sorted(topics)))
    text = read_text_file(source)
    docs = [d.strip() for d in text.split("\n\n\n") if d.strip()]  # blank-line-separated documents
    return docs if len(docs) > 1 else [p for p in text.split("\n\n") if p.strip()]


def read_text_file(path: str | Path) -> str:
    """A UTF-8 training text, refused with the place of the first bad byte rather than garbled."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data.source: text file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a BOM from Windows editors is not text
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "convert it, e.g. `iconv -f latin1 -t utf-8`"
        ) from None
    text = text.replace("\r\n", "\n")  # so Windows line ends still separate documents
    if not text.strip():
        raise UserError(f"data.source: {path} is empty; give a text file with training text")
    return text


def split_documents(docs: list[str], heldout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(len(docs) * heldout_fraction))
    held = sorted(order[:n_held])
    train = sorted(order[n_held:])
    return [docs[i] for i in train], [docs[i] for i in held]


def pack(tokenizer, docs: list[str], seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """Tokenize documents, join them with EOS and cut into [n, seq_len] blocks."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    need = None if max_blocks is None else max_blocks * seq_len
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False).input_ids)
        if eos is not None:
            ids.append(eos)
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def train_and_heldout(
    tokenizer,
    source: str,
    seq_len: int,
    heldout_fraction: float,
    seed: int,
    eval_sequences: int,
    max_train_blocks: int | None = None,
):
    docs = load_documents(source)
    if len(docs) < 2:
        raise UserError(
            f"data.source: {source} holds one document; separate documents (or paragraphs) with blank "
            "lines so some can be held out for evaluation"
        )
    train_docs, held_docs = split_documents(docs, heldout_fraction, seed)
    train = pack(tokenizer, train_docs, seq_len, max_train_blocks)
    held = pack(tokenizer, held_docs, seq_len, eval_sequences)
    for what, blocks, d in (("training", train, train_docs), ("held-out", held, held_docs)):
        if len(blocks) == 0:
            found = sum(len(tokenizer(x, add_special_tokens=False).input_ids) + 1 for x in d)
            raise UserError(
                f"data.source: the {what} split of {source} has {found} tokens, fewer than one block of "
                f"{seq_len} tokens; add text, lower data.seq_len, or change "
                "data.heldout_fraction"
            )
    return train, held


def check_enough_blocks(train: torch.Tensor, batch_size: int, source: str) -> None:
    """The loop needs at least one full batch of distinct blocks."""
    if len(train) < batch_size:
        n_tok = train.numel()
        raise UserError(
            f"data.source: {source} gives {len(train)} training blocks ({n_tok} tokens), fewer than "
            f"distill.batch_size={batch_size} blocks ({batch_size * train.shape[1]} tokens needed); "
            "add text, or lower data.seq_len or distill.batch_size"
        )
