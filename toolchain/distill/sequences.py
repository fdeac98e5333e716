"""Sequence-level (black-box) KD: train on whole responses instead of teacher logits.

Two sources of (prompt, response) pairs, both stored as JSONL with one example a line:
- the teacher's own generations, sampled (seeded) from a list of prompts and cached next to
  the run so they are made once (`generate_pairs`);
- a user's file ("distill your own traffic"): `{"prompt": ..., "response": ...}` or chat
  format `{"messages": [{"role": ..., "content": ...}, ...]}` whose last message is the
  assistant's answer (`read_pairs`).

Each example is rendered with the tokenizer's chat template; the loss applies to the response
tokens only (labels are IGNORE_INDEX on the prompt and on padding), padding is on the right.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from toolchain.data.chat_encoding import encode_example, prompt_token_ids, stop_token_ids
from toolchain.data.task_files import read_pairs, read_prompts  # noqa: F401 (public here too)
from toolchain.devices.placement import model_device
from toolchain.distill.batch import IGNORE_INDEX, Batch
from toolchain.errors import UserError
from toolchain.fileio import atomic_path

log = logging.getLogger(__name__)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def generate_pairs(
    teacher,
    tokenizer,
    prompts: list[str],
    out_path: str | os.PathLike,
    teacher_id: str,
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
    batch_size: int = 8,
) -> list[list[dict]]:
    """Sample one teacher response per prompt (a user turn each), cached as JSONL: `generate_responses`."""
    chats = [[{"role": "user", "content": p}] for p in prompts]
    return generate_responses(
        teacher, tokenizer, chats, out_path, teacher_id, max_new_tokens, temperature, top_p, seed, batch_size
    )


@torch.no_grad()
def generate_responses(
    teacher,
    tokenizer,
    prompts: list[list[dict]],
    out_path: str | os.PathLike,
    teacher_id: str,
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
    batch_size: int = 8,
    samples: int = 1,
) -> list[list[dict]]:
    """The teacher's answers to chat prompts (`samples` each; greedy at temperature 0), cached as JSONL.

    The file is reused when its sidecar `<file>.meta.json` shows it was made by the same teacher,
    prompts and sampling settings; otherwise it is regenerated. The output is plain
    prompt/response (or messages) JSONL, so it can be read, edited and reused like a user's own file.
    """
    if not prompts:
        raise UserError("no prompts to generate teacher responses from")
    out_path = Path(out_path)
    settings = {
        "teacher": teacher_id,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "prompts": hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest(),
    }
    if samples != 1:
        settings["samples"] = samples
    meta_path = out_path.with_name(out_path.name + ".meta.json")
    if out_path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == settings:
        log.info("reusing teacher generations %s", out_path)
        return read_pairs(out_path)
    sampling = (max_new_tokens, temperature, top_p)
    rows = []
    teacher.eval()
    for k in range(samples):
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            # per chunk and sample, so a chunk's samples do not depend on the batches before it
            torch.manual_seed(seed * 1_000_003 + i + k * 7_919)
            for chat, answer in zip(chunk, _answer_batch(teacher, tokenizer, chunk, *sampling)):
                rows.append(_row(chat, answer))
    _write_jsonl(out_path, rows)
    with atomic_path(meta_path) as tmp:
        tmp.write_text(json.dumps(settings, indent=2) + "\n")
    return read_pairs(out_path)


def _row(chat: list[dict], answer: str) -> dict:
    if len(chat) == 1 and chat[0]["role"] == "user":
        return {"prompt": chat[0]["content"], "response": answer}
    return {"messages": [*chat, {"role": "assistant", "content": answer}]}


def _answer_batch(teacher, tokenizer, chats: list[list[dict]], max_new_tokens: int, temperature: float, top_p: float):
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    enc = [prompt_token_ids(tokenizer, c) for c in chats]
    width = max(map(len, enc))
    # left padding for generation, so every prompt ends where decoding starts
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
    dev = model_device(teacher)
    out = teacher.generate(
        input_ids=ids.to(dev),
        attention_mask=mask.to(dev),
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=top_p if temperature > 0 else None,
        pad_token_id=pad,
        eos_token_id=stop_token_ids(tokenizer),
    )
    return [tokenizer.decode(seq, skip_special_tokens=True).strip() for seq in out[:, width:].cpu()]


# ---------------------------------------------------------------------------- encoding


@dataclass
class EncodedSequences:
    input_ids: torch.Tensor  # [N, L] long, right-padded
    labels: torch.Tensor  # [N, L] long, shifted; IGNORE_INDEX on prompt tokens and padding
    attention_mask: torch.Tensor  # [N, L] long
    dropped: int  # examples left out because their prompt alone filled seq_len
    truncated: int  # examples whose response was cut at seq_len

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, indices, one_hot_targets: bool = True) -> Batch:
        """Rows `indices` as a Batch.

        one_hot_targets: attach the response tokens as a k=1 "teacher top-k" with log-prob 0,
        i.e. the teacher's distribution is its own sampled token. The sparse KD loss of that
        target is exactly the CE on the response (sequence-level KD, Kim & Rush 2016), so the
        loop trains black-box without a teacher model, whatever tokenizer the teacher had.
        Without it the loop runs the teacher online on the same tokens (shared tokenizer only).
        """
        idx = torch.as_tensor(list(indices))
        mask = self.attention_mask[idx]
        # rows are right-padded to seq_len; the columns past the longest real row change no real
        # position's output (causal attention), so they are cut: short chat examples cost their length
        width = max(int(mask.sum(1).max()), 1)
        b = Batch(
            input_ids=self.input_ids[idx, :width], labels=self.labels[idx, :width], attention_mask=mask[:, :width]
        )
        if one_hot_targets:
            b.teacher_topk_ids = b.labels.clamp_min(0).unsqueeze(-1)  # ignored positions: any valid id
            b.teacher_topk_logprobs = torch.zeros(b.teacher_topk_ids.shape)
        return b

    def batches(self, batch_size: int = 4, one_hot_targets: bool = True) -> list[Batch]:
        """All rows in order, for held-out evaluation."""
        return [
            self.batch(range(i, min(i + batch_size, len(self))), one_hot_targets)
            for i in range(0, len(self), batch_size)
        ]


def encode_pairs(tokenizer, examples: list[list[dict]], seq_len: int) -> EncodedSequences:
    """Chat-template each example into [seq_len] rows with labels on the answer tokens only."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, labels, masks = [], [], []
    dropped = truncated = 0
    longest_prompt = 0
    for msgs in examples:
        ids, n_prompt = encode_example(tokenizer, msgs)
        longest_prompt = max(longest_prompt, n_prompt)
        if n_prompt >= seq_len or len(ids) <= n_prompt:
            dropped += 1  # no answer token would be inside the window
            continue
        if len(ids) > seq_len + 1:
            truncated += 1
            ids = ids[: seq_len + 1]
        inp, tgt = ids[:-1], ids[1:]
        # tgt[i] is token i+1; it is an answer token when i + 1 >= n_prompt
        lab = [t if i + 1 >= n_prompt else IGNORE_INDEX for i, t in enumerate(tgt)]
        n_pad = seq_len - len(inp)
        rows.append(inp + [pad] * n_pad)
        labels.append(lab + [IGNORE_INDEX] * n_pad)
        masks.append([1] * len(inp) + [0] * n_pad)
    if not rows:
        raise UserError(
            f"all {len(examples)} examples are longer than data.seq_len={seq_len} before their answer "
            f"starts (longest prompt: {longest_prompt} tokens); raise data.seq_len or shorten the prompts"
        )
    if dropped:
        log.warning("%d of %d examples left out: their prompt fills data.seq_len=%d", dropped, len(examples), seq_len)
    return EncodedSequences(torch.tensor(rows), torch.tensor(labels), torch.tensor(masks), dropped, truncated)


def split_examples(examples: list, heldout_fraction: float, max_heldout: int, seed: int) -> tuple[list, list]:
    """Seeded split into (train, held-out); at least one example on each side."""
    import random

    if len(examples) < 2:
        raise UserError(
            f"sequence-level KD needs at least 2 examples (one is held out for evaluation), got {len(examples)}"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_held = min(max_heldout, max(1, round(len(examples) * heldout_fraction)), len(examples) - 1)
    return [examples[i] for i in sorted(order[n_held:])], [examples[i] for i in sorted(order[:n_held])]


def sequence_batch_fn(data: EncodedSequences, batch_size: int, seed: int, one_hot_targets: bool = True):
    """`batch_fn(step) -> Batch` over encoded examples, in the loop's seeded order."""
    from toolchain.data.batch_order import batch_indices

    if len(data) < batch_size:
        raise UserError(
            f"only {len(data)} usable examples for distill.batch_size={batch_size}; "
            "add examples or lower the batch size"
        )

    def batch_fn(step: int) -> Batch:
        return data.batch(batch_indices(step, batch_size, len(data), seed).tolist(), one_hot_targets)

    return batch_fn
