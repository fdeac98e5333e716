"""`toolchain` command line: thin wrappers that parse arguments and call the stage functions.

User errors print one line (`error: ...`) and exit 2; `--debug` shows the traceback.
Heavy imports (torch, transformers) happen inside the commands, so `toolchain bench` and
`toolchain inspect` work on a device with only llama-cpp-python / onnxruntime installed.
"""

from __future__ import annotations

import argparse
import logging
import sys

from toolchain import __version__, commands
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


def _keep_layers(s: str):
    try:
        return [int(x) for x in s.split(",")] if "," in s else int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number or a comma-separated list of layer indices, got '{s}'"
        ) from None


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
    r.set_defaults(func=commands.cmd_run)

    s = sub.add_parser("student", help="make a depth-pruned student from a teacher, saved as an HF directory")
    s.add_argument("--teacher", required=True, help="bundled name (smollm2-135m-instruct), HF directory or .gguf file")
    s.add_argument("--adapter", help="PEFT/LoRA adapter directory merged into the teacher")
    s.add_argument("--keep-layers", type=_keep_layers, help="number of blocks to keep, or a list like 0,3,7,29")
    s.add_argument(
        "--selection", choices=["angular", "stride"], help="rule choosing which blocks to keep (default angular)"
    )
    s.add_argument("--out", required=True, help="output HF directory")
    _add_config_args(s)
    s.set_defaults(func=commands.cmd_student)

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
    d.set_defaults(func=commands.cmd_distill)

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
    c.set_defaults(func=commands.cmd_distill_cache)

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
    g.set_defaults(func=commands.cmd_export_gguf)
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
    o.set_defaults(func=commands.cmd_export_onnx)

    v = sub.add_parser("verify", help="check GGUF/ONNX exports against the torch model (fails on thresholds)")
    v.add_argument("model", help="HF model directory the exports came from")
    v.add_argument("exports", nargs="+", help=".gguf files and/or ONNX folders")
    _add_config_args(v)
    v.set_defaults(func=commands.cmd_verify)

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
    b.set_defaults(func=commands.cmd_bench)

    i = sub.add_parser("inspect", help="print what a GGUF, ONNX folder, HF directory or run directory holds")
    i.add_argument("path")
    i.set_defaults(func=commands.cmd_inspect)

    rep = sub.add_parser("report", help="re-render report.md and report.html from a run directory's report.json")
    rep.add_argument("run_dir")
    rep.set_defaults(func=commands.cmd_report)
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
