"""A user's task: examples with a capability bucket and a gold answer, split by seed, stratified by bucket.

One JSON object a line: `{"messages": [...]}` (the last message the assistant's answer) or
`{"prompt": ..., "response": ...}`, with optional `"bucket"` (the capability it exercises, e.g.
"refunds", "tool-calling", "edge-cases") and `"answer"` (the gold answer a grader compares with,
when it differs from the response, e.g. the label inside a longer reply). Train, calibration and
eval splits are drawn per bucket, so every capability is in the eval split and eval examples are
never trained on. No torch here: the config validation reads the file before any stage runs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

from toolchain.data.graders import GraderConfig, Ungradable, check_gold
from toolchain.data.task_files import messages_from, read_jsonl_objects
from toolchain.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_BUCKET = "all"


@dataclass(frozen=True)
class TaskExample:
    messages: list[dict]  # the chat, ending with the assistant's (gold) response
    bucket: str
    answer: str  # what the grader compares with: `answer` if given, else the response
    line: int  # where it is in the file, for messages about it

    @property
    def prompt(self) -> list[dict]:
        """The chat up to the answer: what a model is given."""
        return self.messages[:-1]


@dataclass(frozen=True)
class TaskSplits:
    train: list[TaskExample]
    calib: list[TaskExample]  # a few train-like examples for student selection / importance
    eval: list[TaskExample]

    def buckets(self) -> list[str]:
        return sorted({e.bucket for e in self.train + self.calib + self.eval})


def _example_from(obj, where: str, no: int) -> TaskExample:
    messages = messages_from(obj, where)
    bucket = obj.get("bucket", DEFAULT_BUCKET)
    if not isinstance(bucket, str) or not bucket.strip():
        raise UserError(f"{where}: 'bucket' must be a non-empty string, got {json.dumps(bucket)}")
    answer = obj.get("answer", messages[-1]["content"])
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    elif isinstance(answer, (dict, list)):
        answer = json.dumps(answer, ensure_ascii=False)
    if not isinstance(answer, str):
        raise UserError(f"{where}: 'answer' must be a string, a number or JSON, got {type(answer).__name__}")
    if not messages[-1]["content"].strip():
        raise UserError(f"{where}: the response is empty; every example needs the answer it teaches")
    return TaskExample(messages=messages, bucket=bucket.strip(), answer=answer, line=no)


def read_task(
    path: str | os.PathLike, grader: GraderConfig, bucket_graders: dict[str, GraderConfig] | None = None
) -> list[TaskExample]:
    """Every example of a task JSONL, each gold answer checked against its bucket's grader."""
    path = Path(path)
    bucket_graders = bucket_graders or {}
    examples = []
    for no, obj in read_jsonl_objects(path, "task file"):
        ex = _example_from(obj, f"{path}:{no}", no)
        g = bucket_graders.get(ex.bucket, grader)
        try:
            check_gold(g, ex.answer)
        except Ungradable as e:
            raise UserError(f"{path}:{no}: {e} (grader '{g.kind}' of bucket '{ex.bucket}')") from None
        examples.append(ex)
    if not examples:
        raise UserError(f'{path} holds no examples; it needs one JSON object per line with "messages" or "prompt"')
    unknown = sorted(set(bucket_graders) - {e.bucket for e in examples})
    if unknown:
        raise UserError(f"task.bucket_graders names bucket '{unknown[0]}', which no example in {path} has")
    return examples


def split_task(
    examples: list[TaskExample],
    eval_fraction: float,
    calib_fraction: float,
    seed: int,
    max_eval_per_bucket: int | None = None,
    min_eval_per_bucket: int = 20,
) -> TaskSplits:
    """Seeded, stratified split: each bucket gives round(n * fraction) (at least 1) to eval and to
    calibration, the rest to training. A bucket with fewer eval examples than `min_eval_per_bucket`
    is warned about: its accuracy moves in steps of 1/n."""
    by_bucket: dict[str, list[TaskExample]] = {}
    for e in examples:
        by_bucket.setdefault(e.bucket, []).append(e)
    train, calib, evals = [], [], []
    for bucket in sorted(by_bucket):
        items = list(by_bucket[bucket])
        random.Random(f"{seed}:{bucket}").shuffle(items)  # per bucket: adding a bucket leaves the others
        if len(items) < 3:
            raise UserError(
                f"task bucket '{bucket}' has {len(items)} example(s); it needs at least 3 (train, calibration, eval)"
            )
        n_eval = max(1, round(len(items) * eval_fraction))
        if max_eval_per_bucket is not None:
            n_eval = min(n_eval, max_eval_per_bucket)
        n_calib = max(1, round(len(items) * calib_fraction))
        evals += items[:n_eval]
        calib += items[n_eval : n_eval + n_calib]
        train += items[n_eval + n_calib :]
        if n_eval < min_eval_per_bucket:
            log.warning(
                "task bucket '%s': %d eval example(s) of %d (fewer than %d); its accuracy moves in steps of %.0f%%",
                bucket,
                n_eval,
                len(items),
                min_eval_per_bucket,
                100 / n_eval,
            )
    if not train:
        raise UserError("the task's train split is empty; add examples or lower task.eval_fraction")
    return TaskSplits(train=train, calib=calib, eval=evals)


def bucket_counts(examples: list[TaskExample]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in examples:
        out[e.bucket] = out.get(e.bucket, 0) + 1
    return dict(sorted(out.items()))


def stratified_cap(examples: list[TaskExample], total: int) -> list[TaskExample]:
    """At most `total` examples, the same share of each bucket (at least one each), order kept."""
    counts = bucket_counts(examples)
    if len(examples) <= total:
        return list(examples)
    quota = {b: max(1, math.floor(total * n / len(examples))) for b, n in counts.items()}
    out, taken = [], dict.fromkeys(counts, 0)
    for e in examples:
        if taken[e.bucket] < quota[e.bucket]:
            out.append(e)
            taken[e.bucket] += 1
    return out
