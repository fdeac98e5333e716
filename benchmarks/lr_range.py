"""Which distillation learning rates converge on which models? An lr range test for `distill.lr`.

For each model and each lr, runs a short distillation with the project's engine
(`distill_student`, divergence guard on at its default ratio) and records held-out
KL(teacher || student) and CE before and after, whether the guard stopped the run as diverged,
and the seconds taken. Models:

- smollm2: bundled SmolLM2-135M-Instruct, student keeps 10 of 30 blocks (angular rule), alpha 0.5;
- gemma3: bundled Gemma-3-270M, student keeps 6 of 18 blocks (angular rule), alpha 0.5; 12 steps
  instead of 20 and lrs from 1e-4 (a 20-step run takes over 15 minutes on 2 shared CPU cores);
- tiny-llama, tiny-qwen2, tiny-qwen3, tiny-gemma3_text: random 3-block, 64-wide teachers; the
  student is the teacher with gaussian noise (std 0.05) on every 2-D block weight, KL only.

Before-figures are measured once per model (the untrained student on the held-out split the
engine evaluates). A diverged run reports the held-out figures where the guard stopped it
("after") and its best evaluation. Prints a table, then one JSON line with all figures.

    .venv/bin/python benchmarks/lr_range.py [--models smollm2,tiny-llama] [--lrs 1e-4,3e-4] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

from toolchain.config import DataConfig, DistillConfig
from toolchain.data.corpus import train_and_heldout
from toolchain.distill.evaluate import evaluate
from toolchain.distill.run import calibration_blocks, distill_student
from toolchain.errors import DivergenceError
from toolchain.models.load import load_model, resolve_model_dir
from toolchain.student import build_student

LRS = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3)
# name: (bundled teacher, blocks kept, steps, default lrs). Gemma-3-270M is cut to 12 steps
# and no 3e-5: one 20-step run took over 15 minutes on the 2 shared CPU cores here.
REAL = {"smollm2": ("smollm2-135m-instruct", 10, 20, LRS), "gemma3": ("gemma3-270m", 6, 12, LRS[1:])}
TINY = ("llama", "qwen2", "qwen3", "gemma3_text")
MODELS = ("smollm2", *(f"tiny-{t}" for t in TINY), "gemma3")  # gemma3, the slowest, last


def make_tiny_causal_lm(out: Path, tokenizer_src: Path, model_type: str, layers: int = 3, seed: int = 0) -> Path:
    """A tiny random decoder (copied from tests/conftest.py): 64 wide, weights drawn wider than
    the default init so logits are far from uniform."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_src)
    extra = {
        "qwen3": {"head_dim": 32},
        "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8},
    }
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=model_type != "qwen2",
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **extra.get(model_type, {}),
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 or name.endswith("bias"):
                p.normal_(0, 0.08)
            elif name.endswith("norm.weight"):
                # Gemma's norms are offsets from 1, the others are scales around 1
                p.normal_(0.0 if model_type.startswith("gemma") else 1.0, 0.2)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "toolchain.json").write_text(json.dumps({"name": f"tiny-{model_type}", "license": "apache-2.0"}) + "\n")
    return out


def perturb(student_dir: Path, std: float = 0.05, seed: int = 0) -> None:
    """Add gaussian noise to every 2-D weight under "layers" in the saved student."""
    path = student_dir / "model.safetensors"
    weights = load_file(path)
    g = torch.Generator().manual_seed(seed)
    for name, w in weights.items():
        if "layers" in name and w.dim() == 2:
            weights[name] = w + std * torch.randn(w.shape, generator=g, dtype=w.dtype)
    save_file(weights, path, metadata={"format": "pt"})


def prepare(model: str, root: Path):
    """(teacher, student dir, DataConfig, DistillConfig fields) for one model."""
    if model in REAL:
        spec, keep, steps, _ = REAL[model]
        teacher, data = load_model(spec), DataConfig(seq_len=128, eval_sequences=8)
        fields = {"steps": steps, "batch_size": 4}
    else:
        teacher_dir = make_tiny_causal_lm(
            root / "teacher", resolve_model_dir("smollm2-135m-instruct"), model.removeprefix("tiny-")
        )
        teacher, keep = load_model(str(teacher_dir)), 3
        data, fields = DataConfig(seq_len=32, eval_sequences=4), {"steps": 16, "batch_size": 2, "alpha": 0.0}
    calib = calibration_blocks(teacher.tokenizer, DataConfig(seq_len=128), 8)
    build_student(teacher, root / "student", keep, calib)
    if model not in REAL:
        perturb(root / "student")
    return teacher, root / "student", data, fields


def heldout_before(teacher, student_dir: Path, data: DataConfig) -> dict:
    """Held-out figures of the untrained student, on the split `distill_student` evaluates (the
    same for every lr; a DivergenceError's figures do not carry them)."""
    _, held = train_and_heldout(
        teacher.tokenizer, data.source, data.seq_len + 1, data.heldout_fraction, data.seed, data.eval_sequences
    )
    return evaluate(load_model(str(student_dir)).model, teacher.model, held)


def run_one(teacher, student_dir: Path, data: DataConfig, fields: dict, lr: float, before: dict) -> dict:
    cfg = DistillConfig(lr=lr, warmup_steps=2, checkpoint_every=1000, eval_every="auto", **fields)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        try:
            r = distill_student(
                teacher, student_dir, Path(work) / "out", data, cfg, Path(work) / "work", progress=False
            )
            after, best, diverged = r["after"], r["best"], False
        except DivergenceError as e:
            after, best, diverged = e.figures["last"], e.figures["best"], True
    return {
        "kl_before": before["kl"],
        "kl_after": after.get("kl"),
        "ce_before": before["ce"],
        "ce_after": after.get("ce"),
        "diverged": diverged,
        "best": {k: best.get(k) for k in ("step", "kl", "ce")},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "-" if v is None else str(v)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument(
        "--lrs",
        help=f"comma-separated learning rates (default {','.join(f'{lr:g}' for lr in LRS)}; gemma3 without 3e-5)",
    )
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()  # keep the log to the table
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        ap.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")

    t_start = time.perf_counter()
    results: dict = {}
    header = (
        f"{'model':<18}{'lr':>8}{'KL before':>11}{'KL after':>10}{'CE before':>11}{'CE after':>10}"
        f"{'diverged':>10}{'best step':>10}{'seconds':>9}"
    )
    print(header, flush=True)
    for model in models:
        with tempfile.TemporaryDirectory() as root:
            teacher, student_dir, data, fields = prepare(model, Path(root))
            before = heldout_before(teacher, student_dir, data)
            lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else REAL.get(model, (LRS,))[-1]
            for lr in lrs:
                row = run_one(teacher, student_dir, data, fields, lr, before)
                results.setdefault(model, {})[f"{lr:g}"] = row
                print(
                    f"{model:<18}{lr:>8g}{fmt(row['kl_before']):>11}{fmt(row['kl_after']):>10}"
                    f"{fmt(row['ce_before']):>11}{fmt(row['ce_after']):>10}{fmt(row['diverged']):>10}"
                    f"{fmt(row['best']['step']):>10}{row['seconds']:>9.1f}",
                    flush=True,
                )
    print(f"total {time.perf_counter() - t_start:.0f} s", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
