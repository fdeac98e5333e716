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


FIELD = commands.FIELD


def _keep_layers(s: str):
    try:
        return [int(x) for x in s.split(",")] if "," in s else int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number or a comma-separated list of layer indices, got '{s}'"
        ) from None


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


class _PatternTypes(argparse.Action):
    """Repeated PATTERN=TYPE flags collected into one {pattern: type} dict."""

    def __call__(self, parser, namespace, value, option_string=None):
        pattern, sep, type_name = str(value).rpartition("=")
        if not sep or not pattern or not type_name:
            parser.error(f"{option_string} expects PATTERN=TYPE (e.g. token_embd=Q8_0), got '{value}'")
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest) or {}), pattern: type_name})


_ARG_TYPES = {int: int, float: float, str: str, list[str]: _csv}


def _field(p, flag: str, key: str, help: str, **kw) -> None:
    """A flag that assigns the config field `key`: parsed to the field's type, defaulting to the
    config (YAML, `--set`, then the dataclass default), never a default of its own."""
    from toolchain.config import config_field

    tp, default = config_field(key)
    if "type" not in kw and kw.get("action") is None:
        kw["type"] = _ARG_TYPES[tp]
    shown = ",".join(map(str, default)) if isinstance(default, list) else default
    if "choices" not in kw:  # argparse would show the dest, e.g. FIELD:DISTILL.STEPS
        kw.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
    p.add_argument(flag, dest=FIELD + key, default=None, help=f"{help} (config {key}; default {shown})", **kw)


def _add_config_args(p, with_file: bool = True) -> None:
    if with_file:
        p.add_argument("--config", help="pipeline YAML whose sections (data, distill, verify, ...) supply settings")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set distill.steps=20 (repeatable)",
    )


def _add_teacher(p) -> None:
    _field(p, "--teacher", "teacher.model", "bundled name (smollm2-135m-instruct), HF directory or .gguf file")
    _field(p, "--adapter", "teacher.adapter", "PEFT/LoRA adapter directory for the teacher", type=str)


def _add_run(sub) -> None:
    r = sub.add_parser("run", help="run the whole pipeline from a config into a run directory (resumable)")
    r.add_argument("config", help="pipeline YAML, e.g. examples/quickstart.yaml")
    r.add_argument("--out", required=True, help="run directory; rerunning with the same one skips finished stages")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_config_args(r, with_file=False)
    r.set_defaults(func=commands.cmd_run)


def _add_finetune(sub) -> None:
    f = sub.add_parser("finetune", help="fine-tune the teacher on a task's train split (LoRA, QLoRA or full), merged")
    _add_teacher(f)
    _field(f, "--task", "task.path", "task JSONL: messages or prompt/response, optional bucket and answer", type=str)
    _field(
        f,
        "--method",
        "finetune.method",
        "lora, qlora (4-bit base, bitsandbytes) or full",
        choices=["lora", "qlora", "full"],
    )
    _field(f, "--steps", "finetune.steps", "optimizer steps")
    _field(f, "--lr", "finetune.lr", "peak learning rate")
    f.add_argument("--out", required=True, help="output HF directory (the fine-tuned teacher)")
    f.add_argument("--work", help="checkpoint directory (default: OUT.work); rerun to resume")
    _add_config_args(f)
    f.set_defaults(func=commands.cmd_finetune)


def _add_eval(sub) -> None:
    e = sub.add_parser("eval", help="task accuracy per bucket of HF dirs (torch), .gguf (llama.cpp) and ONNX folders")
    e.add_argument("models", nargs="+", help="HF model directories, .gguf files and/or ONNX folders")
    _field(e, "--task", "task.path", "task JSONL; its eval split (by task.seed) is what is scored", type=str)
    e.add_argument("--tokenizer", help="HF directory whose tokenizer and chat template a .gguf is prompted with")
    _field(e, "--max-new-tokens", "task.max_new_tokens", "answer length")
    e.add_argument("--json", help="also write every answer and score to this JSON file")
    _add_config_args(e)
    e.set_defaults(func=commands.cmd_eval)


def _add_student(sub) -> None:
    s = sub.add_parser("student", help="make a depth-pruned student from a teacher, saved as an HF directory")
    _add_teacher(s)
    _field(
        s, "--keep-layers", "student.keep_layers", "blocks to keep: a number or a list like 0,3,7,29", type=_keep_layers
    )
    _field(s, "--selection", "student.selection", "rule choosing which blocks to keep", choices=["angular", "stride"])
    s.add_argument("--out", required=True, help="output HF directory")
    _add_config_args(s)
    s.set_defaults(func=commands.cmd_student)


def _add_prune(sub) -> None:
    p = sub.add_parser(
        "prune",
        help="cut a model's width (hidden channels, heads, MLP neurons) and depth by measured importance "
        "to a shape or a budget; the result is a standard HF directory",
    )
    p.add_argument("model", help="HF model directory to prune (e.g. a student from `toolchain student`)")
    p.add_argument("--out", required=True, help="output HF directory (the pruned model)")
    p.add_argument("--work", help="directory for candidates, rounds and heals (default: OUT.work)")
    for key in ("layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
        _field(p, "--" + key.replace("_", "-"), f"prune.{key}", "target shape", type=int)
    _field(p, "--params", "prune.params", "parameter budget: a count like 40M or a fraction like 0.5", type=str)
    _field(p, "--target", "prune.target", "a target profile whose memory the weights + KV cache must fit", type=str)
    _field(
        p,
        "--importance",
        "prune.importance",
        "activation, taylor or random",
        choices=["activation", "taylor", "random"],
    )
    _field(p, "--rounds", "prune.rounds", "prune in this many steps, healing in between (needs --teacher)")
    _field(p, "--heal-steps", "prune.heal_steps", "distillation steps after each round but the last")
    _add_teacher(p)
    _add_config_args(p)
    p.set_defaults(func=commands.cmd_prune)


def _add_distill(sub) -> None:
    d = sub.add_parser("distill", help="distill a student directory from a teacher (logit KD), resumable")
    _add_teacher(d)
    d.add_argument("--student", required=True, help="student HF directory (e.g. from `toolchain student`)")
    d.add_argument("--out", required=True, help="where the distilled student is saved")
    d.add_argument("--work", help="checkpoint directory (default: OUT.work); rerun to resume")
    d.add_argument("--no-progress", action="store_true")
    _field(
        d,
        "--loss",
        "distill.loss",
        "divergence to the teacher: forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl, tvd",
    )
    _field(d, "--alpha", "distill.alpha", "weight of hard-label CE; (1 - alpha) * T^2 goes to the divergence")
    _field(d, "--temperature", "distill.temperature", "softmax temperature T of both models in the divergence")
    _field(d, "--beta", "distill.beta", "jsd: teacher weight in the mixture (0 = forward KL, 1 = reverse KL)")
    _field(d, "--steps", "distill.steps", "optimizer steps")
    _field(
        d,
        "--device",
        "distill.device",
        "auto (the GPU when torch sees one), cpu, cuda or cuda:N; under accelerate launch / torchrun "
        "each process takes its LOCAL_RANK's GPU",
    )
    _add_config_args(d)
    d.set_defaults(func=commands.cmd_distill)


def _add_quantize(sub) -> None:
    from toolchain.formats import FAKE_QUANT_TYPES, QAT_TYPES

    q = sub.add_parser(
        "quantize",
        help="quantization-aware distillation: the student trains through a GGUF type's exact rounding",
    )
    _add_teacher(q)
    q.add_argument("--student", required=True, help="the distilled student's HF directory")
    q.add_argument("--out", required=True, help="where the rounded student is saved (then: toolchain export gguf)")
    q.add_argument(
        "--type",
        required=True,
        choices=QAT_TYPES,
        help="what the student will ship as: a GGUF type, or int4 (the ONNX int4 export)",
    )
    q.add_argument("--work", help="checkpoint directory (default: OUT.work); rerun to resume")
    q.add_argument("--no-progress", action="store_true")
    _field(q, "--steps", "quantize.steps", "optimizer steps")
    _field(q, "--lr", "quantize.lr", "learning rate")
    _field(
        q,
        "--override",
        "export.gguf_overrides",
        "per-tensor type, as for `export gguf` (give the export the same): PATTERN=TYPE, TYPE one of "
        f"{', '.join(FAKE_QUANT_TYPES)}; repeatable",
        action=_PatternTypes,
        metavar="PATTERN=TYPE",
    )
    _add_config_args(q)
    q.set_defaults(func=commands.cmd_quantize)


def _add_distill_cache(sub) -> None:
    c = sub.add_parser(
        "distill-cache",
        help="run the teacher once and store its top-k log-probs for "
        "data.mode: cache (resumable; refused if teacher or data change)",
    )
    _add_teacher(c)
    c.add_argument(
        "--out", required=True, help="cache directory (then train with --set data.mode=cache --set data.cache_dir=OUT)"
    )
    _field(c, "--k", "data.cache_k", "top-k log-probs stored per token")
    c.add_argument("--no-progress", action="store_true")
    _add_config_args(c)
    c.set_defaults(func=commands.cmd_distill_cache)


def _add_export(sub) -> None:
    e = sub.add_parser("export", help="export a model: gguf or onnx")
    esub = e.add_subparsers(dest="format", required=True, metavar="FORMAT")
    g = esub.add_parser("gguf", help="write GGUF files (+ an Ollama Modelfile)")
    g.add_argument("model", help="HF model directory")
    g.add_argument("--out", required=True, help="output directory for model-<TYPE>.gguf files")
    _field(g, "--types", "export.gguf", "comma-separated GGUF types")
    g.add_argument("--name", help="model name written into the GGUF metadata")
    g.add_argument("--no-modelfile", action="store_true", help="do not write an Ollama Modelfile")
    _field(
        g,
        "--override",
        "export.gguf_overrides",
        "per-tensor type: GGUF tensor names matching the regex PATTERN get TYPE "
        "(e.g. token_embd=Q8_0 or '^output=F16'); repeatable; not applied to F16/F32 files",
        action=_PatternTypes,
        metavar="PATTERN=TYPE",
    )
    g.add_argument("--imatrix", help="importance matrix file (llama.cpp GGUF format; `toolchain imatrix`)")
    _add_config_args(g)
    g.set_defaults(func=commands.cmd_export_gguf)
    im = sub.add_parser("imatrix", help="measure an importance matrix for llama.cpp's quantizer (its GGUF format)")
    im.add_argument("model", help="HF model directory")
    im.add_argument("--out", required=True, help="imatrix file to write (e.g. imatrix.gguf)")
    _field(im, "--rows", "export.imatrix_rows", "calibration rows (the task's inputs, else the text)")
    _add_config_args(im)
    im.set_defaults(func=commands.cmd_imatrix)
    o = esub.add_parser("onnx", help="write an ONNX decoder with KV cache (fp32, and fp16/int8/int4 beside it)")
    o.add_argument("model", help="HF model directory")
    o.add_argument("--out", required=True, help="output folder (model.onnx, tokenizer, model_info.json)")
    _field(
        o,
        "--precisions",
        "export.onnx_precisions",
        "comma-separated: fp32 (always written, at --out), fp16, int8, int4 (each in OUT-<precision>/)",
    )
    o.add_argument("--no-optimize", action="store_true", help="skip the offline graph fusions (RMSNorm)")
    _add_config_args(o)
    o.set_defaults(func=commands.cmd_export_onnx)


def _add_verify(sub) -> None:
    v = sub.add_parser("verify", help="check GGUF/ONNX exports against the torch model (fails on thresholds)")
    v.add_argument("model", help="HF model directory the exports came from")
    v.add_argument("exports", nargs="+", help=".gguf files and/or ONNX folders")
    _add_config_args(v)
    v.set_defaults(func=commands.cmd_verify)


def _add_bench(sub) -> None:
    b = sub.add_parser("bench", help="speed in llama.cpp (GGUF), onnxruntime (ONNX) and torch (HF dir) on targets")
    b.add_argument("models", nargs="+", help=".gguf files, ONNX folders and/or HF model directories")
    _field(
        b,
        "--target",
        "bench.targets",
        "target profile (cpu, phone-mid, phone-low, rpi5, cuda, shipped with the package) or a YAML path; repeatable",
        action="append",
    )
    _field(b, "--prompt-tokens", "bench.prompt_tokens", "long prompt for prefill")
    _field(b, "--short-prompt-tokens", "bench.short_prompt_tokens", "short prompt for prefill")
    _field(b, "--gen-tokens", "bench.gen_tokens", "tokens decoded per run")
    _field(b, "--runs", "bench.runs", "timed runs after a warm-up")
    b.add_argument("--out-dir", help="write one JSON per model and target here")
    b.add_argument("--json", help="also write all results to this JSON file")
    _add_config_args(b)
    b.set_defaults(func=commands.cmd_bench)


def _add_disagree(sub) -> None:
    d = sub.add_parser("disagree", help="prompts where student and teacher answer differently, ranked, as task JSONL")
    d.add_argument("--teacher", required=True, help="HF directory, .gguf or ONNX folder")
    d.add_argument("--student", required=True, help="HF directory, .gguf or ONNX folder")
    d.add_argument("--prompts", required=True, help="task JSONL (messages/prompt) or one prompt per line")
    d.add_argument("--out", required=True, help="JSONL of the top rows (answer = the teacher's)")
    d.add_argument("--top", type=int, default=100, help="rows to write")
    d.add_argument("--teacher-tokenizer", help="HF directory of a GGUF teacher (its tokenizer and chat template)")
    d.add_argument("--student-tokenizer", help="HF directory of a GGUF student")
    d.add_argument("--max-new-tokens", type=int, default=64)
    d.set_defaults(func=commands.cmd_disagree)


def _add_pack(sub) -> None:
    k = sub.add_parser("pack", help="an app bundle from a finished run: verified exports, tokenizer, manifest, card")
    k.add_argument("run_dir")
    k.add_argument("--out", required=True, help="bundle folder to write")
    k.add_argument("--gguf", nargs="+", metavar="TYPE", help="GGUF types to ship (default: all the run verified)")
    k.add_argument("--onnx", nargs="+", metavar="PRECISION", help="ONNX precisions to ship (default: all; 'none')")
    k.add_argument("--zip", action="store_true", help="also write BUNDLE.zip")
    k.add_argument("--temperature", type=float, default=0.0, help="apps' default sampling temperature (0: greedy)")
    k.add_argument("--no-calibrate", action="store_true", help="skip the fallback threshold (runs with a task)")
    k.add_argument(
        "--max-accuracy-drop", type=float, default=0.01, help="routed accuracy kept within this of the teacher's"
    )
    k.set_defaults(func=commands.cmd_pack)


def _add_inspect_and_report(sub) -> None:
    i = sub.add_parser(
        "inspect",
        help="print what a GGUF, ONNX folder, HF directory, run directory or bundle (checksums checked) holds",
    )
    i.add_argument("path")
    i.set_defaults(func=commands.cmd_inspect)
    rep = sub.add_parser("report", help="re-render report.md and report.html from a run directory's report.json")
    rep.add_argument("run_dir")
    rep.set_defaults(func=commands.cmd_report)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="toolchain", description="Distill, compress and export language models for edge devices."
    )
    p.add_argument("--version", action="version", version=f"toolchain {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    adders = [
        _add_run,
        _add_finetune,
        _add_student,
        _add_prune,
        _add_distill,
        _add_quantize,
        _add_distill_cache,
        _add_export,
        _add_verify,
    ]
    for add in [*adders, _add_eval, _add_disagree, _add_bench, _add_pack]:
        add(sub)
    _add_inspect_and_report(sub)
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
