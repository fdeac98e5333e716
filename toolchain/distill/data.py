"""Offline training text, split into train and held-out by document, then packed into blocks.

The default corpus is the stdlib's `pydoc_data.topics` (~465k characters of technical English,
present on every Python install, so no download). Splitting by topic, not by block, keeps
held-out text genuinely unseen.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch


def load_documents(source: str) -> list[str]:
    if source == "pydoc":
        from pydoc_data.topics import topics

        # several topic keys share one text; keep each text once so held-out text never leaks
        return list(dict.fromkeys(topics[k] for k in sorted(topics)))
    text = Path(source).read_text(encoding="utf-8", errors="replace")
    docs = [d.strip() for d in text.split("\n\n\n") if d.strip()]  # blank-line-separated documents
    return docs if len(docs) > 1 else [p for p in text.split("\n\n") if p.strip()]


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


def train_and_heldout(tokenizer, source: str, seq_len: int, heldout_fraction: float, seed: int,
                      eval_sequences: int, max_train_blocks: int | None = None):
    train_docs, held_docs = split_documents(load_documents(source), heldout_fraction, seed)
    train = pack(tokenizer, train_docs, seq_len, max_train_blocks)
    held = pack(tokenizer, held_docs, seq_len, eval_sequences)
    return train, held
