"""Pick the training data for `data.mode`: one `batch_fn(step) -> Batch` plus held-out data.

- text: packed text blocks; the loop runs the teacher online (white-box logit KD).
- cache: the teacher's top-k log-probs, stored once (`cache.py`) for the training and the
  held-out blocks; training and evaluation then run with the teacher not loaded at all. A
  cache made with another teacher, tokenizer or data is refused before training starts.
- sequences: black-box KD on (prompt, response) pairs from a user's JSONL or from teacher
  generations; the response tokens are one-hot targets, so no teacher model is needed in the
  loop and the teacher may have any tokenizer.
- task: the `task` section's train split. Targets are the teacher's own answers to its prompts
  (sequence-level KD; with `teacher_logits`, white-box KD on those sequences too: the loop runs
  the teacher and matches its distribution on every answer token) or the gold answers (SFT, the
  baseline). The calibration split is the held-out set the divergence guard watches; the eval
  split is never seen here.

`prepare_data` is what the stage function (`run.py`) calls; it loads the teacher only when the
mode needs it (`teacher` may be a zero-argument function that loads it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from toolchain.config import DataConfig, DistillConfig, TaskConfig, TeacherConfig
from toolchain.errors import UserError


@dataclass
class DataPlan:
    batch_fn: Callable
    heldout: object  # packed blocks [n, L+1] or a list of Batch (what `evaluate` takes)
    needs_teacher: bool  # whether the loop and evaluation run the teacher model
    info: dict = field(default_factory=dict)  # figures for the report (mode, sizes, cache bytes/token)


def teacher_id_for(t: TeacherConfig) -> str:
    """The cache fingerprint's teacher digest, from the config alone (the teacher is not loaded)."""
    from toolchain.distill.cache import teacher_digest
    from toolchain.models.load import resolve_model_dir

    quantize, mode = getattr(t, "quantize", "none"), getattr(t, "adapter_mode", "merge")
    variant = {"dtype": t.dtype, "quantize": quantize, "adapter_mode": mode if t.adapter else None}
    return teacher_digest(resolve_model_dir(t.model), t.adapter, variant)


def loaded_teacher_id(loaded) -> str:
    """The same digest for an already loaded teacher (`load_model` or `load_teacher`)."""
    from toolchain.distill.cache import teacher_digest

    adapter = loaded.meta.get("adapter")
    variant = loaded.meta.get("variant") or {
        "dtype": str(loaded.model.dtype).removeprefix("torch."),
        "quantize": "none",
        "adapter_mode": "merge" if adapter else None,
    }
    return teacher_digest(loaded.path, adapter, variant)


def _resolve(teacher):
    return teacher() if callable(teacher) else teacher


def prepare_data(
    data: DataConfig,
    cfg: DistillConfig,
    student,
    student_tok,
    work_dir: str | os.PathLike,
    teacher=None,
    teacher_cfg: TeacherConfig | None = None,
    progress: bool = False,
    task: TaskConfig | None = None,
) -> DataPlan:
    """Build the batch source for `data.mode`. `teacher`: a LoadedModel, or a function returning one."""
    from toolchain.data.corpus import check_enough_blocks, train_and_heldout

    work_dir = Path(work_dir)
    if data.mode == "sequences":
        return _sequences(data, cfg, student_tok, work_dir, teacher, teacher_cfg)
    if data.mode == "task":
        if task is None or task.path is None:
            raise UserError("data.mode: task trains on the task's examples: set task.path to its JSONL")
        return _task(data, cfg, student, student_tok, work_dir, teacher, teacher_cfg, task)
    train, held = train_and_heldout(
        student_tok,
        data.source,
        data.seq_len + 1,
        data.heldout_fraction,
        data.seed,
        data.eval_sequences,
        max_train_blocks=data.max_train_blocks,
    )
    check_enough_blocks(train, cfg.batch_size * cfg.grad_accum, data.source)
    info = {"mode": data.mode, "train_blocks": len(train), "heldout_blocks": len(held)}
    if data.mode == "text":
        from toolchain.distill.loop import packed_batches
        from toolchain.distill.vocab import shared_vocab_size

        t = _resolve(teacher)
        if t is None:
            raise UserError("data.mode: text runs the teacher online; a teacher is needed")
        shared_vocab_size(t.model, t.tokenizer, student, student_tok)
        return DataPlan(packed_batches(train, cfg.batch_size, cfg.seed), held, True, info)
    if data.mode == "cache":
        return _cache(data, cfg, student, student_tok, work_dir, teacher, teacher_cfg, train, held, info, progress)
    raise UserError(f"data.mode: '{data.mode}' is not one of text, cache, sequences, task")


def _cache(data, cfg, student, student_tok, work_dir, teacher, teacher_cfg, train, held, info, progress) -> DataPlan:
    from toolchain.distill import cache as C

    root = Path(data.cache_dir) if data.cache_dir else work_dir / "teacher-cache"
    if teacher_cfg is not None:
        tid = teacher_id_for(teacher_cfg)
    elif teacher is not None and not callable(teacher):
        tid = loaded_teacher_id(teacher)
    else:
        raise UserError("data.mode: cache needs the teacher's config (or the loaded teacher) to check the cache")
    vocab = C.vocab_digest(student_tok)
    caches = {}
    for split, blocks in (("train", train), ("heldout", held)):
        d = root / split
        expect = C.fingerprint(tid, vocab, C.data_digest(blocks), data.cache_k, blocks.shape[1] - 1)
        if not (d / C.MANIFEST).is_file():
            t = _resolve(teacher)
            if t is None:
                raise UserError(f"no teacher cache at {d} and no teacher to build one; run `toolchain distill-cache`")
            if C.vocab_digest(t.tokenizer) != vocab:
                from toolchain.distill.vocab import shared_vocab_size

                shared_vocab_size(t.model, t.tokenizer, student, student_tok)  # raises with the differences
            C.build_cache(
                t.model, t.tokenizer, blocks, d, data.cache_k, tid, batch_size=cfg.batch_size, progress=progress
            )
        caches[split] = C.TeacherCache(d, expect=expect)
    if student is not None:
        rows = student.get_output_embeddings().weight.shape[0]
        if rows < caches["train"].manifest["vocab"]:
            raise UserError(
                f"the student has {rows} output rows, fewer than the cache's vocabulary "
                f"({caches['train'].manifest['vocab']})"
            )
    m = caches["train"].manifest
    info.update(
        cache_dir=str(root),
        cache_k=data.cache_k,
        cache_bytes=m["bytes"],
        cache_bytes_per_token=m["bytes_per_token"],
        cache_build_seconds=m["build_seconds"],
    )
    h = caches["heldout"]
    held_batches = [h.batch(range(i, min(i + 4, len(h)))) for i in range(0, len(h), 4)]
    return DataPlan(C.cache_batch_fn(caches["train"], cfg.batch_size, cfg.seed), held_batches, False, info)


def _sequences(data, cfg, student_tok, work_dir, teacher, teacher_cfg) -> DataPlan:
    from toolchain.distill import sequences as S

    if data.pairs:
        examples = S.read_pairs(data.pairs)
        source = data.pairs
    else:
        chats = [[{"role": "user", "content": p}] for p in S.read_prompts(data.prompts)]
        missing = "data.prompts: generating responses needs the teacher; give one, or use data.pairs"
        _, examples, source = _teacher_answers(
            data, teacher, teacher_cfg, work_dir, chats, "generations.jsonl", missing
        )
    train_ex, held_ex = S.split_examples(examples, data.heldout_fraction, data.eval_sequences, data.seed)
    return _sequence_plan({"mode": "sequences", "source": source}, train_ex, held_ex, student_tok, data, cfg, False)


def _teacher_answers(data, teacher, teacher_cfg, work_dir, chats, filename: str, missing: str, samples: int = 1):
    """(teacher, its answers to `chats` as examples, the JSONL they are kept in), made once."""
    from toolchain.distill import sequences as S

    t = _resolve(teacher)
    if t is None:
        raise UserError(missing)
    tid = teacher_id_for(teacher_cfg) if teacher_cfg is not None else loaded_teacher_id(t)
    out = (Path(data.cache_dir) if data.cache_dir else work_dir) / filename
    examples = S.generate_responses(
        t.model,
        t.tokenizer,
        chats,
        out,
        tid,
        max_new_tokens=data.gen_max_new_tokens,
        temperature=data.gen_temperature,
        seed=data.seed,
        samples=samples,
    )
    return t, examples, str(out)


def _sequence_plan(info: dict, train_ex, held_ex, student_tok, data, cfg, white_box: bool) -> DataPlan:
    """Chat examples encoded for the loop: one-hot targets (black-box), or the teacher run online."""
    from toolchain.distill import sequences as S

    train = S.encode_pairs(student_tok, train_ex, data.seq_len)
    held = S.encode_pairs(student_tok, held_ex, data.seq_len)
    info = {
        **info,
        "train_examples": len(train),
        "heldout_examples": len(held),
        "dropped_too_long": train.dropped + held.dropped,
        "truncated": train.truncated + held.truncated,
    }
    fn = S.sequence_batch_fn(train, cfg.batch_size, cfg.seed, one_hot_targets=not white_box)
    return DataPlan(fn, held.batches(4, one_hot_targets=not white_box), white_box, info)


def _task(data, cfg, student, student_tok, work_dir, teacher, teacher_cfg, task: TaskConfig) -> DataPlan:
    from toolchain.distill.vocab import shared_vocab_size

    splits = task.splits()
    white_box = data.task_targets == "teacher" and data.teacher_logits
    train = _examples_used(splits.train, cfg)
    if data.task_targets == "gold":
        train_ex = [e.messages for e in train]
        source = f"{task.path} (gold answers)"
    else:
        missing = "data.task_targets: teacher needs the teacher to answer the task's prompts"
        chats = [e.prompt for e in train]
        t, train_ex, source = _teacher_answers(
            data, teacher, teacher_cfg, work_dir, chats, "task-generations.jsonl", missing, data.gen_samples
        )
        if white_box:
            shared_vocab_size(t.model, t.tokenizer, student, student_tok)
    info = {"mode": "task", "targets": data.task_targets, "teacher_logits": white_box, "source": source}
    held_ex = [e.messages for e in splits.calib]
    return _sequence_plan(info, train_ex, held_ex, student_tok, data, cfg, white_box)


def _examples_used(train: list, cfg: DistillConfig) -> list:
    """The train examples the steps will see: all of them, or (when the run sees fewer than the
    split holds) that many, the same share of each bucket. The teacher answers only these:
    generating for examples no step reaches is most of the stage's time on a large split."""
    from toolchain.data.tasks import stratified_cap

    seen = cfg.steps * cfg.batch_size * cfg.grad_accum
    return stratified_cap(train, seen) if seen < len(train) else train
