"""`toolchain run CONFIG`: every stage into one run directory, resumable.

Each finished stage leaves `stages/<name>.json` (written atomically, last); a rerun with the
same `--out` skips stages whose record exists. The resolved config is kept as `config.yaml`;
a rerun with a different config is refused rather than mixing two runs in one directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import cast

from toolchain.config import Config, dump_yaml, to_dict
from toolchain.errors import DivergenceError, UserError, VerificationError
from toolchain.fileio import check_writable_dir, copy_dir, dir_bytes, write_json, write_text
from toolchain.formats import Artifact

log = logging.getLogger(__name__)

STAGES = (
    *("finetune", "teacher", "student", "prune", "distill", "prune_again", "quantize"),
    *("export_gguf", "export_onnx", "verify", "eval", "bench", "pack"),
)


class Run:
    def __init__(self, config: Config, out: Path, progress: bool = True, echo=print):
        self.config, self.out, self.progress, self.echo = config, out, progress, echo
        self._teacher = None

    # ------------------------------------------------------------------ helpers
    def path(self, *parts) -> Path:
        return self.out.joinpath(*parts)

    def record(self, stage: str) -> dict | None:
        p = self.path("stages", f"{stage}.json")
        return json.loads(p.read_text()) if p.is_file() else None

    @property
    def teacher_config(self):
        """The teacher every stage after `finetune` starts from: the fine-tuned one when it ran."""
        tuned = (self.record("finetune") or {}).get("path")
        return dataclasses.replace(self.config.teacher, model=tuned, adapter=None) if tuned else self.config.teacher

    @property
    def teacher(self):
        if self._teacher is None:
            from toolchain.models.load import load_model

            t = self.teacher_config
            self.echo(f"loading teacher {t.model}" + (f" + adapter {t.adapter}" if t.adapter else ""))
            self._teacher = load_model(t.model, t.adapter, t.dtype)
        return self._teacher

    @property
    def distill_teacher(self):
        """The teacher as distillation uses it: 8/4-bit or with an attached adapter when configured.

        The student is still made from the plain teacher (`self.teacher`): its blocks are copied,
        and quantized or LoRA-wrapped blocks are not something to copy into a student.
        """
        t = self.teacher_config
        if t.quantize == "none" and (t.adapter_mode == "merge" or not t.adapter):
            return self.teacher
        if getattr(self, "_distill_teacher", None) is None:
            from toolchain.devices.placement import resolve_device
            from toolchain.models.load import teacher_from_config

            self.echo(f"loading teacher {t.model} for distillation (quantize {t.quantize}, adapter {t.adapter_mode})")
            # a bitsandbytes teacher cannot be moved after loading: load it where distillation runs
            self._distill_teacher = teacher_from_config(t, str(resolve_device(self.config.distill.device)))
        return self._distill_teacher

    # ------------------------------------------------------------------ stages
    def stage_finetune(self) -> dict:
        if not self.config.finetune.enabled:
            return {}
        from toolchain.finetune.run import finetune_teacher

        splits = self.config.task.splits()
        out, work = self.path("work", "teacher-finetuned"), self.path("work", "finetune")
        res = finetune_teacher(self.config.teacher, splits.train, out, self.config.finetune, work, echo=self.echo)
        self.echo(f"  answer loss {res['loss_first10']:.3f} -> {res['loss_last10']:.3f} over {res['steps']} steps")
        return res

    def stage_teacher(self) -> dict:
        from toolchain.models.artifacts import describe_teacher

        finetuned = bool((self.record("finetune") or {}).get("path"))
        return describe_teacher(self.teacher, self.config.teacher.adapter, finetuned)

    def _calibration(self, n: int):
        from toolchain.student import calibration_rows

        return calibration_rows(self.teacher.tokenizer, self.config.data, self.config.task, n)

    def stage_student(self) -> dict:
        from toolchain.student import build_student

        s = self.config.student
        calib = self._calibration(s.calib_sequences)
        res = build_student(self.teacher, self.path("work", "student-init"), s.keep_layers, calib, s.selection)
        self.echo(f"student keeps layers {res['kept_layers']} ({res['params'] / 1e6:.1f} M params)")
        return res

    @property
    def student_init(self) -> Path:
        """The student distillation starts from: the pruned one when the prune stage ran."""
        pruned = (self.record("prune") or {}).get("path")
        return Path(pruned) if pruned else self.path("work", "student-init")

    def _heal(self):
        """The prune stages' healing: a short distillation from the teacher with the run's settings."""
        from toolchain.distill.heal import make_heal

        return make_heal(
            lambda: self.distill_teacher,
            self.config.data,
            self.config.distill,
            self.path("work", "prune", "teacher-data"),
            self.teacher_config,
            self.config.task,
            self.echo,
        )

    def stage_prune(self) -> dict:
        p = self.config.prune
        if not p.enabled:
            return {}
        from toolchain.prune import prune_student

        res = prune_student(
            self.path("work", "student-init"),
            self.path("work", "student-pruned"),
            p,
            self._calibration(p.calib_sequences),
            self.path("work", "prune"),
            heal=self._heal(),
        )
        self.echo(
            f"pruned to {res['shape']} ({res['params_before'] / 1e6:.1f} -> {res['params'] / 1e6:.1f} M params), "
            f"held-out KL to the unpruned student {res['heldout_kl']:.3f}"
        )
        return res

    def _distill_student(self) -> dict:
        from toolchain.distill.run import distill_student

        # a function, so a complete teacher cache or a JSONL of pairs never loads the teacher
        return distill_student(
            lambda: self.distill_teacher,
            self.student_init,
            self.path("student"),
            self.config.data,
            self.config.distill,
            self.path("work", "distill"),
            self.progress,
            teacher_cfg=self.teacher_config,
            task=self.config.task,
        )

    def stage_distill(self) -> dict:
        res = self._distill_student()
        write_json(self.path("logs", "distill_history.json"), res.pop("history"))
        b, a = res["before"], res["after"]
        self.echo(
            f"held-out KL {b['kl']:.3f} -> {a['kl']:.3f}, agreement {b['top1_agreement']:.1%} -> "
            f"{a['top1_agreement']:.1%}, CE {b['ce']:.3f} -> {a['ce']:.3f}"
            + (f" (teacher {a['teacher_ce']:.3f})" if a.get("teacher_ce") is not None else "")
        )
        res["bytes"] = dir_bytes(self.path("student"))
        return res

    def stage_prune_again(self) -> dict:
        """The distilled student cut again (prune.again) and healed by a second distillation, in
        place: the distilled student is kept in work/student-distilled."""
        second, again = self.config.prune.second_cut(), self.config.prune.again
        if second is None or again is None:
            return {}
        from toolchain.distill.heal import prune_again

        distilled = self.path("work", "student-distilled")
        if not distilled.is_dir():  # a rerun after a crash starts again from the distilled student
            copy_dir(self.path("student"), distilled)
        cfg = dataclasses.replace(self.config.distill, steps=again.steps)
        res, history = prune_again(
            distilled,
            self.path("student"),
            second,
            self._calibration(second.calib_sequences),
            self.path("work"),
            self._heal(),
            lambda: self.distill_teacher,
            self.config.data,
            cfg,
            self.progress,
            teacher_cfg=self.teacher_config,
            task=self.config.task,
            echo=self.echo,
        )
        write_json(self.path("logs", "prune_again_history.json"), history)
        res["bytes"] = dir_bytes(self.path("student"))
        return res

    def stage_quantize(self) -> dict:
        """Quantization-aware distillation (quantize.qat) in place; the float weights stay in work/student-float."""
        q = self.config.quantize
        if q.qat == "none":
            return {}
        from toolchain.export.gguf import qat_tensor_types
        from toolchain.quantize.qat import qad_distill_config, qat_distill

        before = self.path("work", "student-float")
        if not before.is_dir():  # a rerun after a crash starts again from the distilled weights
            copy_dir(self.path("student"), before)
        overrides = self.config.export.gguf_overrides
        res = qat_distill(
            lambda: self.distill_teacher,
            before,
            self.path("student"),
            self.config.data,
            qad_distill_config(self.config.distill, q),
            self.path("work", "quantize"),
            q.qat,
            overrides,
            self.progress,
            teacher_cfg=self.teacher_config,
            task=self.config.task,
            gguf_types=qat_tensor_types(before, q.qat, overrides),
            round_activations=q.round_activations,
            learn_scales=q.learn_scales,
        )
        write_json(self.path("logs", "quantize_history.json"), res.pop("history"))
        b, a = res["before"], res["after"]
        self.echo(
            f"{q.qat}-rounded student, held-out KL {b['kl']:.3f} -> {a['kl']:.3f}, "
            f"agreement {b['top1_agreement']:.1%} -> {a['top1_agreement']:.1%}"
        )
        return {"qat": q.qat, "overrides": dict(self.config.export.gguf_overrides), **res}

    def stage_export_gguf(self) -> dict:
        from toolchain.export.gguf import export_gguf, gguf_filename, summary_lines
        from toolchain.export.ollama import write_modelfile

        types = self.config.export.gguf
        if not types:
            return {"files": []}
        imatrix, judge = self._imatrix(types)
        files = export_gguf(
            self.path("student"),
            self.path("export"),
            types,
            name=self.config.name,
            overrides=self.config.export.gguf_overrides,
            imatrix=imatrix,
            judge=judge,
        )
        # Ollama gets the smallest file by default; users can point FROM at another.
        pick = min(files, key=lambda f: f["bytes"])
        mf, warning = write_modelfile(self.path("student"), self.path("export", gguf_filename(pick["quant"])))
        if warning:
            self.echo(f"  warning: {warning}")
        for line in summary_lines(files):
            self.echo(f"  {line}")
        return {"files": files, "modelfile": str(mf), "modelfile_warning": warning}

    def _student_calibration(self, n: int):
        """n calibration rows in the student's own tokenizer (the teacher's): no teacher weights
        are loaded for them."""
        from transformers import AutoTokenizer

        from toolchain.student import calibration_rows

        tok = AutoTokenizer.from_pretrained(self.path("student"))
        return calibration_rows(tok, self.config.data, self.config.task, n)

    def _imatrix(self, types: list[str]):
        """(the student's importance matrix on the run's calibration rows, a judge that keeps it
        for a type only where its file measures closer to the F16 on other calibration rows),
        when a type's rounding uses one; else (None, None)."""
        from toolchain.formats import IMATRIX_TYPES

        e = self.config.export
        if not e.imatrix or not any(t in IMATRIX_TYPES for t in types):
            return None, None
        from toolchain.quantize import imatrix as I
        from toolchain.verify.quality import kld_judge

        rows = self._student_calibration(e.imatrix_rows + I.JUDGE_ROWS)
        dataset, out = str(self.config.task.path or self.config.data.source), self.path("export", "imatrix.gguf")
        values, facts, judged = I.measure_holding_out(self.path("student"), rows, dataset, out)
        self.echo(f"  importance matrix: {len(values)} tensors from {facts['chunks']} x {rows.shape[1]} tokens")
        return (values, facts), (kld_judge(judged) if judged else None)

    def stage_export_onnx(self) -> Artifact | dict:
        if not self.config.export.onnx:
            return {}
        from toolchain.export.onnx import export_onnx

        precisions = self.config.export.onnx_precisions
        # the int4 blocks' grid is measured on the run's own calibration rows (the task's inputs)
        calib = self._student_calibration(4) if "int4" in precisions else None
        return export_onnx(self.path("student"), self.path("export", "onnx"), precisions, calib=calib)

    def _exports(self) -> list[Artifact]:
        from toolchain.pack.build import run_exports

        return cast(list[Artifact], run_exports(self.out))

    def stage_verify(self) -> dict:
        from toolchain.verify.exports import summary_lines, verify_exports

        results = verify_exports(self.path("student"), self._exports(), self.config.verify, data=self.config.data)
        for line in summary_lines(results):
            self.echo(f"  {line}")
        if any(r.get("quality") for r in results):
            from toolchain.verify.quality import format_table

            self.echo(format_table(results, "  GGUF quality on held-out text:"))
        return {"results": results}

    def stage_eval(self) -> dict:
        if not self.config.task.path:
            return {}
        from toolchain.eval.run import evaluate_models

        res = evaluate_models(self._eval_models(), self.config.task.splits().eval, self.config.task, echo=self.echo)
        from toolchain.eval.score import format_table

        self.echo(format_table({k: v["score"] for k, v in res["models"].items()}, "  task accuracy (eval split):"))
        return res

    def _eval_models(self) -> dict:
        """name -> (Artifact, tokenizer directory): teachers and students in torch, exports as shipped."""
        from toolchain.eval.run import models_to_evaluate
        from toolchain.models.load import resolve_model_dir

        tuned = (self.record("finetune") or {}).get("path")
        base = resolve_model_dir(self.config.teacher.model) if tuned else None
        return models_to_evaluate(self.teacher.path, base, self.student_init, self.path("student"), self._exports())

    def stage_bench(self) -> dict:
        from toolchain.bench.run import bench_targets, describe_model
        from toolchain.targets import load_target

        b = self.config.bench
        targets = [load_target(t) for t in b.targets]
        models = self._exports() + ([describe_model(self.path("student"))] if b.torch_baseline else [])
        results = bench_targets(
            models,
            targets,
            b.prompt_tokens,
            b.gen_tokens,
            b.runs,
            progress=self.echo,
            out_dir=self.path("bench"),
            short_prompt_tokens=b.short_prompt_tokens,
        )
        return {"targets": [t.name for t in targets], "results": results}

    def stage_pack(self) -> dict:
        p = self.config.pack
        if not p.enabled or not self._exports():
            return {}
        from toolchain.pack.build import pack_run, pack_summary

        m = pack_run(self.out, self.path("bundle"), p.gguf, p.onnx, p.zip, p.temperature,
                     p.calibrate, p.max_accuracy_drop, echo=self.echo)  # fmt: skip
        res = pack_summary(m, self.path("bundle"))
        self.echo(f"  bundle: {res['files']} files, {res['bytes'] / 1e6:.1f} MB -> {res['path']}")
        return res

    # ------------------------------------------------------------------ driver
    def write_report(self, seconds: dict, extra: dict | None = None) -> dict:
        from toolchain.report.build import build_report
        from toolchain.report.html import render as render_html
        from toolchain.report.markdown import render

        stages = {s: r for s in STAGES if (r := self.record(s)) is not None}
        stages.update(extra or {})
        report = build_report(to_dict(self.config), stages, seconds)
        write_json(self.path("report.json"), report)
        write_text(self.path("report.md"), render(report))
        write_text(self.path("report.html"), render_html(report))
        return report

    def run(self) -> dict:
        from toolchain.devices.parallel import barrier, from_env

        par = from_env()
        if not par.main:
            return self._run_helper(par)
        seconds_file = self.path("logs", "stage_seconds.json")
        seconds = json.loads(seconds_file.read_text()) if seconds_file.is_file() else {}
        for stage in STAGES:
            if stage == "distill":
                barrier(par)  # the other processes wait here for the student stage
            if self.record(stage) is not None:
                self.echo(f"[{stage}] done earlier, skipped")
                continue
            self.echo(f"[{stage}] ...")
            t0 = time.perf_counter()
            try:
                result = getattr(self, f"stage_{stage}")()
            except (VerificationError, DivergenceError) as e:
                # keep the figures: the report shows what failed, the stage stays unfinished
                write_json(self.path("logs", f"{stage}_failed.json"), e.figures)
                self.write_report(seconds, {stage: _failed_figures(stage, e.figures)})
                raise
            if result:  # a stage the config turns off returns {}: recorded, but no time of its own
                seconds[stage] = round(time.perf_counter() - t0, 1)
            write_json(self.path("stages", f"{stage}.json"), result)
            write_json(seconds_file, seconds)
            if result:
                self.echo(f"[{stage}] {seconds[stage]:.1f} s")
        report = self.write_report(seconds)
        self.echo(f"report: {self.path('report.md')}  ({sum(seconds.values()):.0f} s in stages)")
        return report

    def _run_helper(self, par) -> dict:
        """A process other than 0 under `accelerate launch`: it only shares the distillation."""
        from toolchain.devices.parallel import barrier

        barrier(par)  # process 0 has made the student (or finds the stages done)
        if self.record("distill") is None:
            self._distill_student()
        return {}


def _failed_figures(stage: str, figures: dict) -> dict:
    """What the report shows of a failed stage (a diverged run: best and last, not the history)."""
    if stage == "distill":
        return {"diverged": True, **{k: v for k, v in figures.items() if k != "history"}}
    return figures


def run_pipeline(config: Config, out: str | Path, progress: bool = True, echo=print) -> dict:
    out = check_writable_dir(out, "run directory")
    resolved = dump_yaml(config)
    cfg_file = out / "config.yaml"
    if cfg_file.is_file() and cfg_file.read_text() != resolved:
        raise UserError(
            f"{out} holds a run made with a different config; use a new --out (or delete {out}) to start over"
        )
    write_text(cfg_file, resolved)
    return Run(config, out, progress, echo).run()
