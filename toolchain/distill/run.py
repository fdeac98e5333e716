"""Distill a saved student directory from a teacher, and save the result: the stage function."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from toolchain.config import DataConfig, DistillConfig, TaskConfig, TeacherConfig
from toolchain.data.corpus import load_documents, pack
from toolchain.distill.hidden import layer_map_from_meta
from toolchain.distill.loop import distill
from toolchain.errors import DivergenceError, UserError
from toolchain.models.load import LoadedModel, count_params, load_model, read_meta, save_model
from toolchain.models.lora import attach_lora, merge_lora

if TYPE_CHECKING:
    import torch

    from toolchain.devices.parallel import Parallel
    from toolchain.distill.modes import DataPlan


def _placed_teacher(teacher, device: torch.device):
    """The teacher placed on the training device when it is loaded: a LoadedModel as is, a
    loading function wrapped so that prepare_data and the loop share its one load."""
    from toolchain.devices.placement import place

    def placed(loaded):
        place(loaded.model, device)  # the teacher cache and generations run there too
        return loaded

    if callable(teacher):
        load = teacher
        return functools.cache(lambda: placed(load()))
    if teacher is not None:
        placed(teacher)
    return teacher


def _prepare_data(
    teacher,
    student: LoadedModel,
    data: DataConfig,
    cfg: DistillConfig,
    work_dir: str | os.PathLike,
    teacher_cfg: TeacherConfig | None,
    progress: bool,
    par: Parallel,
    task: TaskConfig | None = None,
) -> DataPlan:
    from toolchain.devices.parallel import barrier
    from toolchain.distill.modes import prepare_data

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
        task=task,
    )
    if par.main:
        barrier(par)
    return plan


def _eval_sets(plan: DataPlan, data: DataConfig, cfg: DistillConfig, tokenizer) -> dict:
    """The held-out set, then each extra eval file's first eval_sequences blocks."""
    evals = {"heldout": plan.heldout}
    for path in cfg.eval_sets:
        if not plan.needs_teacher:
            raise UserError("distill.eval_sets needs the online teacher (data.mode: text)")
        blocks = pack(tokenizer, load_documents(path), data.seq_len + 1, data.eval_sequences)
        if len(blocks) == 0:
            raise UserError(f"distill.eval_sets: '{path}' holds fewer than {data.seq_len + 1} tokens")
        evals[Path(path).stem] = blocks
    return evals


class StudentTransform(Protocol):
    """A change to the student for the length of the training (e.g. quantize.qat's rounding):
    applied after loading, finished before saving, its meta recorded in the student's and its
    tensor files ({relative path: tensors}, e.g. learned scales) saved beside the weights."""

    @property
    def meta(self) -> dict: ...

    def apply(self, model) -> None: ...

    def finish(self, model) -> None: ...

    @property
    def files(self) -> dict[str, dict]: ...


@dataclass
class _Output:
    """How the trained student is saved: LoRA merged in first, its meta saying how it was made."""

    student: LoadedModel
    model: Any  # what trains: student.model, or its LoRA wrapper
    cfg: DistillConfig
    meta: dict
    transform: StudentTransform | None = None

    def save(self, to: str | os.PathLike) -> None:
        if self.transform is not None:
            self.transform.finish(self.student.model)
            self.meta.update(self.transform.meta)
        lora = self.cfg.lora
        if lora.r:
            self.student.model = merge_lora(self.model)
            self.meta["lora"] = {"r": lora.r, "alpha": lora.alpha, "targets": list(lora.targets), "merged": True}
        files = self.transform.files if self.transform is not None else {}
        save_model(self.student.model, self.student.tokenizer, to, self.meta, files)

    def save_best(self, e: DivergenceError, work_dir: str | os.PathLike) -> DivergenceError:
        """Save the best weights a diverged run handed back; the error that says where they are."""
        best_dir = Path(work_dir) / "best-student"
        self.meta["distilled_steps"] = e.figures["best"].get("step")
        self.save(best_dir)
        e.figures["best_student"] = str(best_dir)
        return DivergenceError(f"{e}; the best student is kept in {best_dir}", e.figures)


def distill_student(
    teacher,
    student_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    data: DataConfig,
    cfg: DistillConfig,
    work_dir: str | os.PathLike,
    progress: bool = True,
    teacher_cfg: TeacherConfig | None = None,
    task: TaskConfig | None = None,
    par: Parallel | None = None,
    transform: StudentTransform | None = None,
) -> dict:
    """Train the student in student_dir towards the teacher; save it to out_dir (atomically).

    `teacher` is a LoadedModel or a zero-argument function returning one: `data.mode` decides
    whether it is needed at all (a complete top-k cache or a JSONL of pairs trains without it).
    Under a multi-process launcher only process 0 saves and returns the full figures; `par`
    overrides the launcher's processes (SINGLE: a run process 0 makes alone, such as a heal
    between pruning rounds while the others wait for the distill stage). `transform` changes the
    student while it trains (applied before the optimizer sees its parameters).
    """
    from toolchain.devices.parallel import from_env
    from toolchain.devices.placement import resolve_device

    par = par or from_env()
    teacher = _placed_teacher(teacher, resolve_device(cfg.device))
    student = load_model(str(student_dir))
    plan = _prepare_data(teacher, student, data, cfg, work_dir, teacher_cfg, progress, par, task)
    t = (teacher() if callable(teacher) else teacher) if plan.needs_teacher else None
    if transform is not None:
        transform.apply(student.model)
    model = attach_lora(student.model, cfg.lora) if cfg.lora.r else student.model
    layer_map = layer_map_from_meta(read_meta(student_dir), student.model.config.get_text_config().num_hidden_layers)
    evals = _eval_sets(plan, data, cfg, student.tokenizer)
    made = read_meta(student_dir)
    meta = {**made, "distilled_steps": cfg.steps, "data_mode": data.mode}
    if transform is not None and "distilled_steps" in made:  # trained again: the transform's meta says how
        meta["distilled_steps"] = made["distilled_steps"]
    output = _Output(student, model, cfg, meta, transform)
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
            raise output.save_best(e, work_dir) from None
        raise
    if not par.main:
        return result
    output.save(out_dir)
    result["params"] = count_params(student.model)
    result.update(plan.info)
    return result


def calibration_blocks(tokenizer, data: DataConfig, n: int):
    """Calibration text for choosing student layers: the first n training blocks."""
    from toolchain.student import calibration_rows

    return calibration_rows(tokenizer, data, None, n)
