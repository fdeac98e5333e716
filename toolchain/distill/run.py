"""Distill a saved student directory from a teacher, and save the result: the stage function."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from toolchain.config import DataConfig, DistillConfig, TeacherConfig
from toolchain.data.corpus import load_documents, pack, train_and_heldout
from toolchain.distill.hidden import layer_map_from_meta
from toolchain.distill.loop import distill
from toolchain.distill.lora import attach_lora, merge_lora
from toolchain.errors import DivergenceError, UserError
from toolchain.models.load import count_params, load_model, read_meta, save_model


def distill_student(
    teacher,
    student_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    data: DataConfig,
    cfg: DistillConfig,
    work_dir: str | os.PathLike,
    progress: bool = True,
    teacher_cfg: TeacherConfig | None = None,
) -> dict:
    """Train the student in student_dir towards the teacher; save it to out_dir (atomically).

    `teacher` is a LoadedModel or a zero-argument function returning one: `data.mode` decides
    whether it is needed at all (a complete top-k cache or a JSONL of pairs trains without it).
    Under a multi-process launcher only process 0 saves and returns the full figures.
    """
    from toolchain.devices.parallel import barrier, from_env
    from toolchain.devices.placement import place, resolve_device
    from toolchain.distill.modes import prepare_data

    par = from_env()
    device = resolve_device(cfg.device)

    def placed(loaded):
        place(loaded.model, device)  # the teacher cache and generations run there too
        return loaded

    if callable(teacher):
        load = teacher
        teacher = functools.cache(lambda: placed(load()))  # prepare_data and the loop share one load
    elif teacher is not None:
        placed(teacher)
    student = load_model(str(student_dir))
    # process 0 prepares first (teacher caches and generations are written once), the others
    # then find them ready
    if not par.main:
        barrier(par)
    plan = prepare_data(
        data,
        cfg,
        student.model,
        student.tokenizer,
        work_dir,
        teacher=teacher,
        teacher_cfg=teacher_cfg,
        progress=progress and par.main,
    )
    if par.main:
        barrier(par)
    t = (teacher() if callable(teacher) else teacher) if plan.needs_teacher else None
    model = attach_lora(student.model, cfg.lora) if cfg.lora.r else student.model
    layer_map = layer_map_from_meta(read_meta(student_dir), student.model.config.get_text_config().num_hidden_layers)
    evals = {"heldout": plan.heldout}
    for path in cfg.eval_sets:  # each extra eval file: its first eval_sequences blocks
        if not plan.needs_teacher:
            raise UserError("distill.eval_sets needs the online teacher (data.mode: text)")
        blocks = pack(student.tokenizer, load_documents(path), data.seq_len + 1, data.eval_sequences)
        if len(blocks) == 0:
            raise UserError(f"distill.eval_sets: '{path}' holds fewer than {data.seq_len + 1} tokens")
        evals[Path(path).stem] = blocks
    meta = {**read_meta(student_dir), "distilled_steps": cfg.steps, "data_mode": data.mode}

    def save(to) -> None:
        if cfg.lora.r:
            student.model = merge_lora(model)
            meta["lora"] = {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "targets": list(cfg.lora.targets), "merged": True}
        save_model(student.model, student.tokenizer, to, meta)

    try:
        result = distill(
            t.model if t is not None else None,
            model,
            plan.batch_fn,
            evals,
            cfg,
            work_dir,
            progress=progress,
            layer_map=layer_map,
            par=par,
        )
    except DivergenceError as e:
        if par.main and e.figures.get("kept_best_weights"):
            best_dir = Path(work_dir) / "best-student"
            meta["distilled_steps"] = e.figures["best"].get("step")
            save(best_dir)
            e.figures["best_student"] = str(best_dir)
            raise DivergenceError(f"{e}; the best student is kept in {best_dir}", e.figures) from None
        raise
    if not par.main:
        return result
    save(out_dir)
    result["params"] = count_params(student.model)
    result.update(plan.info)
    return result


def calibration_blocks(tokenizer, data: DataConfig, n: int):
    """Calibration text for choosing student layers: the first n training blocks."""
    train, _ = train_and_heldout(
        tokenizer, data.source, data.seq_len, data.heldout_fraction, data.seed, data.eval_sequences, max_train_blocks=n
    )
    return train
