"""`toolchain eval`: each model answers the task's eval split in the runtime that ships it; one grader scores all.

A model is an HF directory (torch), a .gguf file (llama.cpp) or an ONNX folder (onnxruntime). The
prompts are rendered with the Hugging Face tokenizer of the model directory the file was made from
(an ONNX folder carries its own), so every runtime is given the same token ids.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from toolchain.config import TaskConfig
from toolchain.data.chat_encoding import prompt_token_ids, stop_token_ids
from toolchain.data.tasks import TaskExample
from toolchain.errors import UserError
from toolchain.eval import generate as G
from toolchain.eval.score import score
from toolchain.formats import Artifact

log = logging.getLogger(__name__)


def _torch_answers(model: Artifact, prompts: list[list[int]], max_new: int, stops: list[int], threads: int):
    from toolchain.models.load import load_model

    loaded = load_model(model["path"])
    return G.torch_generate(loaded.model, prompts, max_new, stops)


def _gguf_answers(model: Artifact, prompts: list[list[int]], max_new: int, stops: list[int], threads: int):
    return G.llama_generate(model["path"], prompts, max_new, stops, threads)


def _onnx_answers(model: Artifact, prompts: list[list[int]], max_new: int, stops: list[int], threads: int):
    return G.onnx_generate(Path(model["path"]).parent, prompts, max_new, stops, threads)


# the runtime that ships each format
_RUNTIMES: dict[str, Callable[..., list[list[int]]]] = {
    "hf": _torch_answers,
    "gguf": _gguf_answers,
    "onnx": _onnx_answers,
}


def runtime_answers(model: Artifact, prompts: list[list[int]], max_new: int, stops: list[int], threads: int = 0):
    """Greedy answer token ids from the runtime that ships `model`'s format."""
    return _RUNTIMES[model["format"]](model, prompts, max_new, stops, threads)


def tokenizer_dir_for(model: Artifact, fallback: str | os.PathLike | None) -> Path:
    """Where the model's HF tokenizer is: the directory itself, the ONNX folder, else `fallback`."""
    path = Path(model["path"])
    own = path if model["format"] == "hf" else path.parent if model["format"] == "onnx" else None
    if own is not None and (own / "tokenizer_config.json").is_file():
        return own
    if fallback is None:
        raise UserError(
            f"{path}: evaluating a GGUF needs the HF directory it was exported from (for its tokenizer and "
            "chat template); pass it with --tokenizer"
        )
    return Path(fallback)


def evaluate_model(
    model: Artifact,
    examples: list[TaskExample],
    task: TaskConfig,
    tokenizer_dir: str | os.PathLike | None = None,
    threads: int = 0,
) -> dict:
    """{format, quant, path, score: {buckets, micro, macro, empty}, samples, seconds} on `examples`."""
    from transformers import AutoTokenizer

    if not examples:
        raise UserError("nothing to evaluate: the task's eval split is empty")
    tok_dir = tokenizer_dir_for(model, tokenizer_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    stops = stop_token_ids(tok, tok_dir)
    prompts = [prompt_token_ids(tok, e.prompt) for e in examples]
    t0 = time.perf_counter()
    raw = runtime_answers(model, prompts, task.max_new_tokens, stops, threads)
    answers = [G.decode_answer(tok, ids, stops) for ids in raw]
    result, right = score(examples, answers, task.grader, task.bucket_graders)
    seconds = time.perf_counter() - t0
    log.info("%s %s: macro %.1f%% in %.0f s", model["format"], model["quant"], 100 * result.macro, seconds)
    samples = [
        {"bucket": e.bucket, "answer": e.answer, "output": a, "correct": ok}
        for e, a, ok in list(zip(examples, answers, right))[:8]
    ]
    return {
        "format": model["format"],
        "quant": model["quant"],
        "path": model["path"],
        "score": result.as_dict(),
        "answers": answers,
        "samples": samples,
        "seconds": round(seconds, 1),
    }


def evaluate_models(
    models: dict[str, tuple[Artifact, str | os.PathLike]],
    examples: list[TaskExample],
    task: TaskConfig,
    reference: str = "teacher",
    echo=print,
) -> dict:
    """Each named (model, tokenizer directory) on the same examples, and every student's retention
    of the `reference` model's accuracy, per bucket and macro."""
    from toolchain.eval.score import retention

    out = {}
    for name, (model, tok_dir) in models.items():
        r = evaluate_model(model, examples, task, tokenizer_dir=tok_dir)
        echo(f"  {name}: macro {r['score']['macro']:.1%}, micro {r['score']['micro']:.1%} ({r['seconds']:.0f} s)")
        out[name] = {k: r[k] for k in ("format", "quant", "path", "score", "samples", "seconds")}
    ref = out.get(reference)
    kept = {n: retention(v["score"], ref["score"]) for n, v in out.items() if ref and n.startswith("student")}
    return {"models": out, "reference": reference, "retention": kept, "examples": len(examples)}


def models_to_evaluate(
    teacher: Path,
    base_teacher: Path | None,
    student_before: Path,
    student: Path,
    exports: list[Artifact],
) -> dict[str, tuple[Artifact, Path]]:
    """name -> (Artifact, tokenizer directory) for a run's models: the teachers (the base one
    when it was fine-tuned) and students in torch, then each export as shipped."""
    from toolchain.models.artifacts import describe_model

    models = {}
    if base_teacher is not None:
        models["base teacher"] = (describe_model(base_teacher), base_teacher)
    models["teacher"] = (describe_model(teacher), teacher)
    models["student, before"] = (describe_model(student_before), student)
    models["student"] = (describe_model(student), student)
    for e in exports:
        models[f"student {e['format']} {e['quant']}"] = (e, student)
    return models
