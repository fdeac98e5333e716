"""Distill a saved student directory from a teacher, and save the result: the stage function."""

from __future__ import annotations

import os
from pathlib import Path

from toolchain.config import DataConfig, DistillConfig
from toolchain.distill.data import train_and_heldout
from toolchain.distill.loop import check_same_vocabulary, distill, packed_batches
from toolchain.models.load import LoadedModel, count_params, load_model, read_meta, save_model


def distill_student(teacher: LoadedModel, student_dir: str | os.PathLike, out_dir: str | os.PathLike,
                    data: DataConfig, cfg: DistillConfig, work_dir: str | os.PathLike, progress: bool = True) -> dict:
    """Train the student in student_dir towards the teacher; save it to out_dir (atomically)."""
    student = load_model(str(student_dir))
    check_same_vocabulary(teacher.tokenizer, student.tokenizer)
    train, held = train_and_heldout(student.tokenizer, data.source, data.seq_len + 1, data.heldout_fraction,
                                    data.seed, data.eval_sequences)
    batch_fn = packed_batches(train, cfg.batch_size, cfg.seed)
    result = distill(teacher.model, student.model, batch_fn, held, cfg, work_dir, progress=progress)
    meta = {**read_meta(student_dir), "distilled_steps": cfg.steps}
    save_model(student.model, student.tokenizer, out_dir, meta)
    result["params"] = count_params(student.model)
    result["train_blocks"], result["heldout_blocks"] = len(train), len(held)
    return result


def calibration_blocks(tokenizer, data: DataConfig, n: int):
    """Calibration text for choosing student layers: the first n training blocks."""
    train, _ = train_and_heldout(tokenizer, data.source, data.seq_len, data.heldout_fraction, data.seed,
                                 data.eval_sequences, max_train_blocks=n)
    return train
