"""What each `toolchain` subcommand does once its arguments are parsed: build the config the
same way for every command, call the stage function, print the result."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from toolchain.errors import UserError

FIELD = "field:"  # argparse dest prefix of flags that assign a config field, e.g. field:distill.steps


def _config(args, fixed: dict | None = None):
    """The command's Config: its YAML (`--config`, or `run`'s file), `--set` overrides, then its
    flags as typed field assignments and any fields the command itself fixes, validated once."""
    from toolchain.config import load_config

    fields = {k[len(FIELD) :]: v for k, v in vars(args).items() if k.startswith(FIELD) and v is not None}
    return load_config(getattr(args, "config", None), args.set or [], {**fields, **(fixed or {})})


def _echo(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------- commands


def cmd_run(args) -> None:
    from toolchain.pipeline import run_pipeline

    t0 = time.perf_counter()
    run_pipeline(_config(args), Path(args.out), progress=not args.no_progress)
    _echo(f"done in {time.perf_counter() - t0:.0f} s: {args.out}")


def cmd_finetune(args) -> None:
    from toolchain.fileio import check_writable_dir
    from toolchain.finetune.run import finetune_teacher

    cfg = _config(args)
    if cfg.task.path is None:
        raise UserError("finetune needs the task's examples: --task FILE.jsonl (or task.path in --config)")
    check_writable_dir(Path(args.out).parent, "output directory")
    splits = cfg.task.splits()
    res = finetune_teacher(cfg.teacher, splits.train, args.out, cfg.finetune, args.work, echo=_echo)
    _echo(json.dumps(res, indent=2))


def cmd_eval(args) -> None:
    from toolchain.eval.run import evaluate_model
    from toolchain.eval.score import format_table
    from toolchain.models.artifacts import describe_model

    cfg = _config(args)
    if cfg.task.path is None:
        raise UserError("eval needs the task's examples: --task FILE.jsonl (or task.path in --config)")
    models = [describe_model(p) for p in args.models]
    examples = cfg.task.splits().eval
    results = {}
    for m in models:
        name = f"{Path(m['path']).parent.name if m['format'] == 'onnx' else Path(m['path']).name} ({m['quant']})"
        results[name] = evaluate_model(m, examples, cfg.task, tokenizer_dir=args.tokenizer)
    print(
        format_table({k: v["score"] for k, v in results.items()}, "task accuracy on the eval split:"), file=sys.stderr
    )
    if args.json:
        from toolchain.fileio import write_json

        write_json(args.json, results)
    _echo(json.dumps({k: v["score"] for k, v in results.items()}, indent=2))


def cmd_student(args) -> None:
    from toolchain.distill.run import calibration_blocks
    from toolchain.fileio import check_writable_dir
    from toolchain.models.load import teacher_from_config
    from toolchain.student import build_student

    cfg = _config(args)
    check_writable_dir(Path(args.out).parent, "output directory")
    teacher = teacher_from_config(cfg.teacher)
    calib = calibration_blocks(teacher.tokenizer, cfg.data, cfg.student.calib_sequences)
    res = build_student(teacher, args.out, cfg.student.keep_layers, calib, cfg.student.selection)
    _echo(json.dumps(res))


def cmd_prune(args) -> None:
    from toolchain.distill.heal import make_heal
    from toolchain.fileio import check_writable_dir
    from toolchain.models.load import load_model, teacher_from_config
    from toolchain.prune import prune_student
    from toolchain.student import calibration_rows

    cfg = _config(args, {"prune.enabled": True})
    if not (Path(args.model) / "config.json").is_file():
        raise UserError(f"model directory not found or not an HF model: {args.model}")
    check_writable_dir(Path(args.out).parent, "output directory")
    work = Path(args.work or f"{args.out}.work")
    p = cfg.prune
    calib = calibration_rows(load_model(args.model).tokenizer, cfg.data, cfg.task, p.calib_sequences)
    heals = (p.rounds > 1 and p.heal_steps) or (p.search_steps and (p.params or p.target))
    heal = None
    if heals:  # the teacher is loaded only when a heal runs
        heal = make_heal(
            lambda: teacher_from_config(cfg.teacher), cfg.data, cfg.distill, work / "teacher-data", cfg.teacher,
            cfg.task, _echo,
        )  # fmt: skip
    res = prune_student(args.model, args.out, p, calib, work, heal=heal)
    _echo(json.dumps(res, indent=2))


def cmd_distill(args) -> None:
    from toolchain.devices.placement import resolve_device
    from toolchain.distill.run import distill_student
    from toolchain.fileio import check_writable_dir
    from toolchain.models.load import teacher_from_config

    cfg = _config(args)
    if not (Path(args.student) / "config.json").is_file():
        raise UserError(f"student directory not found or not an HF model: {args.student}")
    check_writable_dir(Path(args.out).parent, "output directory")
    work = Path(args.work or f"{args.out}.work")
    # loaded only if data.mode needs it; honours teacher.quantize / adapter_mode
    device = str(resolve_device(cfg.distill.device))  # a bitsandbytes teacher is loaded onto it
    res = distill_student(
        lambda: teacher_from_config(cfg.teacher, device),
        args.student,
        args.out,
        cfg.data,
        cfg.distill,
        work,
        progress=not args.no_progress,
        teacher_cfg=cfg.teacher,
        task=cfg.task,
    )
    if "history" not in res:  # a process other than 0 under accelerate launch / torchrun
        return
    res.pop("history")
    _echo(json.dumps(res, indent=2))


def cmd_quantize(args) -> None:
    from toolchain.devices.placement import resolve_device
    from toolchain.export.gguf import qat_tensor_types
    from toolchain.fileio import check_writable_dir
    from toolchain.models.load import teacher_from_config
    from toolchain.quantize.qat import qad_distill_config, qat_distill

    ships_as = (
        {"export.onnx": True, "export.onnx_precisions": ["fp32", "int4"]}
        if args.type == "int4"
        else {"export.gguf": [args.type]}
    )
    cfg = _config(args, {"quantize.qat": args.type, **ships_as})
    if not (Path(args.student) / "config.json").is_file():
        raise UserError(f"student directory not found or not an HF model: {args.student}")
    check_writable_dir(Path(args.out).parent, "output directory")
    device = str(resolve_device(cfg.distill.device))
    q = cfg.quantize
    res = qat_distill(
        lambda: teacher_from_config(cfg.teacher, device),
        args.student,
        args.out,
        cfg.data,
        qad_distill_config(cfg.distill, q),
        Path(args.work or f"{args.out}.work"),
        q.qat,
        cfg.export.gguf_overrides,
        progress=not args.no_progress,
        teacher_cfg=cfg.teacher,
        task=cfg.task,
        gguf_types=qat_tensor_types(args.student, q.qat, cfg.export.gguf_overrides),
        round_activations=q.round_activations,
        learn_scales=q.learn_scales,
    )
    res.pop("history", None)
    _echo(json.dumps(res, indent=2))
    if q.qat == "int4":
        _echo(f"then: toolchain export onnx {args.out} --out DIR --precisions fp32,int4")
        return
    flags = "".join(f" --override '{k}={v}'" for k, v in cfg.export.gguf_overrides.items())
    _echo(f"then: toolchain export gguf {args.out} --out DIR --types {q.qat}{flags}")


def cmd_distill_cache(args) -> None:
    from toolchain.devices.placement import place, resolve_device
    from toolchain.distill.modes import prepare_data
    from toolchain.fileio import check_writable_dir
    from toolchain.models.load import teacher_from_config

    cfg = _config(args, {"data.mode": "cache", "data.cache_dir": args.out})
    check_writable_dir(args.out, "cache directory")
    device = resolve_device(cfg.distill.device)  # the teacher runs over the data there
    teacher = teacher_from_config(cfg.teacher, str(device))
    place(teacher.model, device)
    plan = prepare_data(
        cfg.data,
        cfg.distill,
        teacher.model,
        teacher.tokenizer,
        args.out,
        teacher=teacher,
        teacher_cfg=cfg.teacher,
        progress=not args.no_progress,
    )
    _echo(json.dumps(plan.info, indent=2))


def cmd_export_gguf(args) -> None:
    from toolchain.export.gguf import export_gguf, gguf_filename
    from toolchain.export.ollama import write_modelfile
    from toolchain.formats import IMATRIX_TYPES

    full = _config(args, {"export.imatrix": True} if args.imatrix else None)  # the file is the imatrix
    cfg = full.export
    imatrix = None
    if args.imatrix:
        from toolchain.quantize.imatrix import read

        imatrix = read(args.imatrix)
    elif cfg.imatrix and any(t in IMATRIX_TYPES for t in cfg.gguf):
        imatrix = _measure_imatrix(args.model, full, Path(args.out) / "imatrix.gguf")
    files = export_gguf(args.model, args.out, cfg.gguf, name=args.name, overrides=cfg.gguf_overrides, imatrix=imatrix)
    if not args.no_modelfile:
        pick = min(files, key=lambda f: f["bytes"])
        mf, warning = write_modelfile(args.model, Path(args.out) / gguf_filename(pick["quant"]))
        if warning:
            _echo(f"warning: {warning}")
        _echo(f"Modelfile: {mf}   (then: ollama create NAME -f {mf})")
    _echo(json.dumps(files, indent=2))


def _measure_imatrix(model: str, cfg, out_file: Path):
    """The importance matrix of `model` on the config's calibration rows, kept at `out_file`."""
    from transformers import AutoTokenizer

    from toolchain.quantize.imatrix import measure
    from toolchain.student import calibration_rows

    if not (Path(model) / "config.json").is_file():
        raise UserError(f"{model} is not an HF model directory (no config.json)")
    rows = calibration_rows(AutoTokenizer.from_pretrained(model), cfg.data, cfg.task, cfg.export.imatrix_rows)
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    values, facts = measure(model, rows, str(cfg.task.path or cfg.data.source), out_file)
    _echo(f"importance matrix {out_file}: {len(values)} tensors from {len(rows)} rows x {rows.shape[1]} tokens")
    return values, facts


def cmd_imatrix(args) -> None:
    _measure_imatrix(args.model, _config(args), Path(args.out))


def cmd_export_onnx(args) -> None:
    from toolchain.export.onnx import export_onnx

    cfg = _config(args).export
    _echo(json.dumps(export_onnx(args.model, args.out, cfg.onnx_precisions, optimize=not args.no_optimize), indent=2))


def cmd_verify(args) -> None:
    from toolchain.models.artifacts import describe_model
    from toolchain.verify.exports import verify_exports

    cfg = _config(args)
    exports = [describe_model(p) for p in args.exports]
    not_exports = [e["path"] for e in exports if e["format"] not in ("gguf", "onnx")]
    if not_exports:
        raise UserError(
            f"{not_exports[0]}: verify checks .gguf files and ONNX folders against the model, not HF directories"
        )
    results = verify_exports(args.model, exports, cfg.verify, data=cfg.data)
    if any(r.get("quality") for r in results):
        from toolchain.verify.quality import format_table

        print(format_table(results, "GGUF quality on held-out text:"), file=sys.stderr)
    _echo(json.dumps(results, indent=2))


def cmd_bench(args) -> None:
    from toolchain.bench.run import bench_targets, describe_model
    from toolchain.targets import load_target

    cfg = _config(args).bench
    targets = [load_target(t) for t in cfg.targets]
    models = [describe_model(p) for p in args.models]
    results = bench_targets(
        models,
        targets,
        cfg.prompt_tokens,
        cfg.gen_tokens,
        cfg.runs,
        progress=_echo,
        out_dir=args.out_dir,
        short_prompt_tokens=cfg.short_prompt_tokens,
    )
    if args.json:
        from toolchain.fileio import write_json

        write_json(args.json, results)


def cmd_disagree(args) -> None:
    from toolchain.eval import disagree as D
    from toolchain.eval.run import tokenizer_dir_for
    from toolchain.fileio import write_text

    if args.top < 1 or args.max_new_tokens < 1:
        raise UserError("--top and --max-new-tokens must be >= 1")
    chats = D.read_chats(args.prompts)
    teacher, student = _model_at(args.teacher), _model_at(args.student)
    t_dir = tokenizer_dir_for(teacher, args.teacher_tokenizer)
    s_dir = tokenizer_dir_for(student, args.student_tokenizer)
    s_ans, conf = D.answers(student, chats, s_dir, args.max_new_tokens, with_confidence=True)
    t_ans, _ = D.answers(teacher, chats, t_dir, args.max_new_tokens)
    rows = D.rank(chats, s_ans, t_ans, conf)
    top = rows[: args.top]
    write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in top))
    n = sum(r["disagree"] for r in rows)
    _echo(f"{n} of {len(rows)} prompts answered differently; top {len(top)} written to {args.out}")


def _model_at(path: str):
    from toolchain.models.artifacts import describe_model

    if not Path(path).exists():
        raise UserError(f"model not found: {path}")
    return describe_model(path)


def cmd_pack(args) -> None:
    from toolchain.pack.build import pack_run

    pick = lambda names: [] if names == ["none"] else names
    m = pack_run(args.run_dir, args.out, pick(args.gguf), pick(args.onnx), args.zip, args.temperature,
                 not args.no_calibrate, args.max_accuracy_drop, echo=_echo)  # fmt: skip
    total = sum(f["bytes"] for f in m["files"])
    models = ", ".join(f"{x['format']} {x['quant']}" for x in m["models"])
    _echo(f"bundle {args.out}: {models}; {len(m['files'])} files, {total / 1e6:.1f} MB (manifest.json)")


def cmd_inspect(args) -> None:
    from toolchain.inspect_model import inspect_path

    _echo(json.dumps(inspect_path(args.path), indent=2, default=str))


def cmd_report(args) -> None:
    from toolchain.fileio import write_text
    from toolchain.report.markdown import render

    run = Path(args.run_dir)
    if not (run / "report.json").is_file():
        raise UserError(f"{run} has no report.json; run `toolchain run` first")
    report = json.loads((run / "report.json").read_text())
    md = write_text(run / "report.md", render(report))
    try:
        from toolchain.report.html import render as render_html

        write_text(run / "report.html", render_html(report))
    except ModuleNotFoundError as e:  # device-mode install: no matplotlib
        print(f"report.html not written ({e.name} is not installed)", file=sys.stderr)
    _echo(md.read_text())
