"""`toolchain` command line: thin wrappers that parse arguments and call the stage functions.

User errors print one line (`error: ...`) and exit 2; `--debug` shows the traceback.
Heavy imports (torch, transformers) happen inside the commands, so `toolchain bench` and
`toolchain inspect` work on a device with only llama-cpp-python / onnxruntime installed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from toolchain import __version__
from toolchain.errors import UserError

# modules only the full install has; a device-mode install (toolchain[bench]) lacks them
_FULL_INSTALL_MODULES = {
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "safetensors",
    "onnx",
    "onnxscript",
    "bitsandbytes",
    "matplotlib",
    "jinja2",
}


_DISTILL_FLAGS = (
    "loss",
    "alpha",
    "temperature",
    "beta",
    "steps",
    "device",
)  # `toolchain distill --X v` = `--set distill.X=v`


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _keep_layers(s: str):
    try:
        return [int(x) for x in s.split(",")] if "," in s else int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number or a comma-separated list of layer indices, got '{s}'"
        ) from None


def _config(args, extra: list[str] | tuple[str, ...] = ()):
    from toolchain.config import load_config

    return load_config(getattr(args, "config", None), list(extra) + list(args.set or []))


def _echo(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------- commands


def cmd_run(args) -> None:
    from toolchain.pipeline import run_pipeline

    t0 = time.perf_counter()
    run_pipeline(_config(args), Path(args.out), progress=not args.no_progress)
    _echo(f"done in {time.perf_counter() - t0:.0f} s: {args.out}")


def cmd_student(args) -> None:
    from toolchain.distill.run import calibration_blocks
    from toolchain.fileio import check_writable_dir
    from toolchain.models.load import load_model
    from toolchain.student import build_student

    extra = [f"teacher.model={args.teacher}"] + ([f"student.selection={args.selection}"] if args.selection else [])
    cfg = _config(args, extra)
    keep = args.keep_layers if args.keep_layers is not None else cfg.student.keep_layers
    check_writable_dir(Path(args.out).parent, "output directory")
    teacher = load_model(cfg.teacher.model, args.adapter, cfg.teacher.dtype)
    calib = calibration_blocks(teacher.tokenizer, cfg.data, cfg.student.calib_sequences)
    res = build_student(teacher, args.out, keep, calib, cfg.student.selection)
    _echo(json.dumps(res))


def cmd_distill(args) -> None:
    from toolchain.devices.placement import resolve_device
    from toolchain.distill.run import distill_student
    from toolchain.fileio import check_writable_dir
    from toolchain.models.load import teacher_from_config

    extra = [f"teacher.model={args.teacher}"] + [
        f"distill.{k}={getattr(args, k)}" for k in _DISTILL_FLAGS if getattr(args, k, None) is not None
    ]
    cfg = _config(args, extra)
    if not (Path(args.student) / "config.json").is_file():
        raise UserError(f"student directory not found or not an HF model: {args.student}")
    check_writable_dir(Path(args.out).parent, "output directory")
    if args.adapter:
        cfg.teacher.adapter = args.adapter
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
    )
    if "history" not in res:  # a process other than 0 under accelerate launch / torchrun
        return
    res.pop("history")
    _echo(json.dumps(res, indent=2))


def cmd_distill_cache(args) -> None:
    from toolchain.devices.placement import place, resolve_device
    from toolchain.distill.modes import prepare_data
    from toolchain.fileio import check_writable_dir
    from toolchain.models.load import teacher_from_config

    extra = [f"teacher.model={args.teacher}", "data.mode=cache", f"data.cache_dir={args.out}"]
    extra += [f"data.cache_k={args.k}"] if args.k is not None else []
    extra += [f"teacher.adapter={args.adapter}"] if args.adapter else []
    cfg = _config(args, extra)
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

    files = export_gguf(args.model, args.out, _csv(args.types), name=args.name, overrides=_overrides(args.override))
    if not args.no_modelfile:
        pick = min(files, key=lambda f: f["bytes"])
        mf, warning = write_modelfile(args.model, Path(args.out) / gguf_filename(pick["quant"]))
        if warning:
            _echo(f"warning: {warning}")
        _echo(f"Modelfile: {mf}   (then: ollama create NAME -f {mf})")
    _echo(json.dumps(files, indent=2))


def _overrides(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        pattern, sep, type_name = item.rpartition("=")
        if not sep or not pattern or not type_name:
            raise UserError(f"--override expects PATTERN=TYPE (e.g. token_embd=Q8_0), got '{item}'")
        out[pattern] = type_name
    return out


def cmd_export_onnx(args) -> None:
    from toolchain.export.onnx import export_onnx

    _echo(json.dumps(export_onnx(args.model, args.out, _csv(args.precisions), optimize=not args.no_optimize), indent=2))


def cmd_verify(args) -> None:
    from toolchain.bench.run import describe_model
    from toolchain.verify.exports import verify_exports

    cfg = _config(args)
    exports = [describe_model(p) for p in args.exports]
    not_exports = [e["path"] for e in exports if e["format"] not in ("gguf", "onnx")]
    if not_exports:
        raise UserError(
            f"{not_exports[0]}: verify checks .gguf files and ONNX folders against the model, not HF directories"
        )
    results = verify_exports(args.model, exports, cfg.verify)
    if any(r.get("quality") for r in results):
        from toolchain.verify.quality import format_table

        print(format_table(results, "GGUF quality on held-out text:"), file=sys.stderr)
    _echo(json.dumps(results, indent=2))


def cmd_bench(args) -> None:
    from toolchain.bench.run import bench_targets, describe_model
    from toolchain.targets import load_target

    targets = [load_target(t) for t in (args.target or ["cpu"])]
    models = [describe_model(p) for p in args.models]
    results = bench_targets(
        models,
        targets,
        args.prompt_tokens,
        args.gen_tokens,
        args.runs,
        progress=_echo,
        out_dir=args.out_dir,
        short_prompt_tokens=args.short_prompt_tokens,
    )
    if args.json:
        from toolchain.fileio import write_json

        write_json(args.json, results)


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


# ---------------------------------------------------------------------------- parser


def _add_config_args(p, with_file: bool = True) -> None:
    if with_file:
        p.add_argument("--config", help="pipeline YAML whose sections (data, distill, verify, ...) supply settings")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set distill.steps=20 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="toolchain", description="Distill, compress and export language models for edge devices."
    )
    p.add_argument("--version", action="version", version=f"toolchain {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run the whole pipeline from a config into a run directory (resumable)")
    r.add_argument("config", help="pipeline YAML, e.g. examples/quickstart.yaml")
    r.add_argument("--out", required=True, help="run directory; rerunning with the same one skips finished stages")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_config_args(r, with_file=False)
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("student", help="make a depth-pruned student from a teacher, saved as an HF directory")
    s.add_argument("--teacher", required=True, help="bundled name (smollm2-135m-instruct), HF directory or .gguf file")
    s.add_argument("--adapter", help="PEFT/LoRA adapter directory merged into the teacher")
    s.add_argument("--keep-layers", type=_keep_layers, help="number of blocks to keep, or a list like 0,3,7,29")
    s.add_argument(
        "--selection", choices=["angular", "stride"], help="rule choosing which blocks to keep (default angular)"
    )
    s.add_argument("--out", required=True, help="output HF directory")
    _add_config_args(s)
    s.set_defaults(func=cmd_student)

    d = sub.add_parser("distill", help="distill a student directory from a teacher (logit KD), resumable")
    d.add_argument("--teacher", required=True, help="bundled name, HF directory or .gguf file")
    d.add_argument("--adapter", help="PEFT/LoRA adapter directory merged into the teacher")
    d.add_argument("--student", required=True, help="student HF directory (e.g. from `toolchain student`)")
    d.add_argument("--out", required=True, help="where the distilled student is saved")
    d.add_argument("--work", help="checkpoint directory (default: OUT.work); rerun to resume")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument(
        "--loss",
        help="divergence to the teacher: forward_kl (default), reverse_kl, jsd (generalized, see --beta), "
        "skew_kl / skew_reverse_kl (see distill.skew), tvd",
    )
    d.add_argument("--alpha", type=float, help="weight of hard-label CE; (1 - alpha) * T^2 goes to the divergence")
    d.add_argument("--temperature", type=float, help="softmax temperature T of both models in the divergence")
    d.add_argument("--beta", type=float, help="jsd: teacher weight in the mixture (0 = forward KL, 1 = reverse KL)")
    d.add_argument("--steps", type=int, help="optimizer steps")
    d.add_argument(
        "--device",
        help="auto (default: the GPU when torch sees one), cpu, cuda or cuda:N; under "
        "accelerate launch / torchrun each process takes its LOCAL_RANK's GPU",
    )
    _add_config_args(d)
    d.set_defaults(func=cmd_distill)

    c = sub.add_parser(
        "distill-cache",
        help="run the teacher once and store its top-k log-probs for "
        "data.mode: cache (resumable; refused if teacher or data change)",
    )
    c.add_argument("--teacher", required=True, help="bundled name, HF directory or .gguf file")
    c.add_argument("--adapter", help="PEFT/LoRA adapter directory for the teacher")
    c.add_argument(
        "--out", required=True, help="cache directory (then train with --set data.mode=cache --set data.cache_dir=OUT)"
    )
    c.add_argument("--k", type=int, help="top-k log-probs stored per token (default data.cache_k, 64)")
    c.add_argument("--no-progress", action="store_true")
    _add_config_args(c)
    c.set_defaults(func=cmd_distill_cache)

    e = sub.add_parser("export", help="export a model: gguf or onnx")
    esub = e.add_subparsers(dest="format", required=True, metavar="FORMAT")
    g = esub.add_parser("gguf", help="write GGUF files (+ an Ollama Modelfile)")
    g.add_argument("model", help="HF model directory")
    g.add_argument("--out", required=True, help="output directory for model-<TYPE>.gguf files")
    g.add_argument("--types", default="F16,Q8_0,Q4_K_M", help="comma-separated GGUF types (default F16,Q8_0,Q4_K_M)")
    g.add_argument("--name", help="model name written into the GGUF metadata")
    g.add_argument("--no-modelfile", action="store_true", help="do not write an Ollama Modelfile")
    g.add_argument(
        "--override",
        action="append",
        metavar="PATTERN=TYPE",
        help="per-tensor type: GGUF tensor names matching the regex PATTERN get TYPE "
        "(e.g. token_embd=Q8_0 or '^output=F16'); repeatable; not applied to F16/F32 files",
    )
    g.set_defaults(func=cmd_export_gguf)
    o = esub.add_parser("onnx", help="write an ONNX decoder with KV cache (fp32, and fp16/int8/int4 beside it)")
    o.add_argument("model", help="HF model directory")
    o.add_argument("--out", required=True, help="output folder (model.onnx, tokenizer, model_info.json)")
    o.add_argument(
        "--precisions",
        default="fp32",
        help="comma-separated: fp32 (always written, at --out), fp16, int8, int4 (each in OUT-<precision>/); "
        "default fp32",
    )
    o.add_argument("--no-optimize", action="store_true", help="skip the offline graph fusions (RMSNorm)")
    o.set_defaults(func=cmd_export_onnx)

    v = sub.add_parser("verify", help="check GGUF/ONNX exports against the torch model (fails on thresholds)")
    v.add_argument("model", help="HF model directory the exports came from")
    v.add_argument("exports", nargs="+", help=".gguf files and/or ONNX folders")
    _add_config_args(v)
    v.set_defaults(func=cmd_verify)

    b = sub.add_parser("bench", help="speed in llama.cpp (GGUF), onnxruntime (ONNX) and torch (HF dir) on targets")
    b.add_argument("models", nargs="+", help=".gguf files, ONNX folders and/or HF model directories")
    b.add_argument(
        "--target",
        action="append",
        help="target profile in targets/ (cpu, phone-mid, phone-low, rpi5, cuda) or a YAML path; "
        "repeatable (default cpu)",
    )
    b.add_argument("--prompt-tokens", type=int, default=512, help="long prompt for prefill (default 512)")
    b.add_argument("--short-prompt-tokens", type=int, default=32, help="short prompt for prefill (default 32)")
    b.add_argument("--gen-tokens", type=int, default=128, help="tokens decoded per run (default 128)")
    b.add_argument("--runs", type=int, default=5, help="timed runs after a warm-up (default 5)")
    b.add_argument("--out-dir", help="write one JSON per model and target here")
    b.add_argument("--json", help="also write all results to this JSON file")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("inspect", help="print what a GGUF, ONNX folder, HF directory or run directory holds")
    i.add_argument("path")
    i.set_defaults(func=cmd_inspect)

    rep = sub.add_parser("report", help="re-render report.md and report.html from a run directory's report.json")
    rep.add_argument("run_dir")
    rep.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    import os

    # transformers' per-load progress bars ("Loading weights", "Writing model shards") bury
    # our own output; our progress bars are separate and stay
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # already imported (embedded use): the env var came too late
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if not args.debug:
        import warnings

        warnings.filterwarnings("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        args.func(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if args.debug or e.name not in _FULL_INSTALL_MODULES:
            raise
        print(
            f"error: `toolchain {args.command}` needs the full install (module '{e.name}' is missing): "
            "pip install 'toolchain[all]'",
            file=sys.stderr,
        )
        return 2
    except OSError as e:  # disk full, permission denied, ...: the cause is the message
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
