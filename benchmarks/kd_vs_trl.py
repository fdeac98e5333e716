"""Our distillation engine vs TRL's GKDTrainer vs plain SFT, side by side on this CPU.

Teacher: the embedded SmolLM2-135M-Instruct. Student: the same 10-block init for every run
(angular selection, built once). Data: pydoc text packed into 4 x 128-token batches in one
fixed order (the same blocks at the same step for every run). AdamW lr 1e-4, 4 warmup steps
then cosine, grad clip 1.0, fp32, 2 threads, N steps (default 60).

Runs (each in its own process, so peak RSS and allocator settings are per run):
- ours:      toolchain's loop, forward KL at T=1, alpha=0 (the objective TRL's GKD loss computes
             at beta=0: it ignores `temperature`, which only drives its generation),
             with `distill.compile` (torch.compile of both decoder bodies; compiling falls in the
             first steps, which steady-state tokens/s leaves out);
- ours_eager: the same without compiling (TRL runs eager too: its `torch_compile` is off by default);
- trl:       GKDTrainer, lmbda=0, beta=0, temperature=2, bf16 and gradient checkpointing off,
             process as it starts by default;
- trl_tuned: the same, given the process-level tuning ours applies (malloc settings, threads),
             so the table separates what is engine from what is environment;
- sft:       our loop with alpha=1 (hard-label CE only, the teacher is never run).

Tokens/s is steady state: tokens of steps 3..N over their wall time (the first steps pay
one-off allocations). Held-out CE / KL(teacher || student) / top-1 agreement come from the
same `evaluate` for every run. Prints a table, then one JSON line.

    flock /tmp/toolchain-measure.lock .venv/bin/python benchmarks/kd_vs_trl.py [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH, SEQ, LR, WARMUP, THREADS, SEED = 4, 128, 1e-4, 4, 2, 0
SKIP = 2  # steps left out of steady-state tokens/s
RUNS = ("ours", "ours_eager", "trl", "trl_tuned", "sft")


def _data():
    from toolchain.config import DataConfig
    from toolchain.data.corpus import train_and_heldout
    from toolchain.models.load import load_model

    teacher = load_model("smollm2-135m-instruct")
    d = DataConfig(seq_len=SEQ)
    train, held = train_and_heldout(teacher.tokenizer, d.source, SEQ + 1, d.heldout_fraction, d.seed, d.eval_sequences)
    return teacher, train, held


def _ordered_blocks(train, steps: int):
    """The blocks of every step in training order: step s gets the loop's seeded slice s."""
    import torch

    from toolchain.data.batch_order import batch_indices

    return torch.cat([train[batch_indices(s, BATCH, len(train), SEED)] for s in range(steps)])


def _steady_tps(step_seconds: list[float]) -> float:
    t = step_seconds[SKIP:]
    return BATCH * SEQ * len(t) / sum(t)


def worker(run: str, student_dir: str, steps: int) -> dict:
    import torch

    from toolchain.config import DistillConfig
    from toolchain.distill.batch import Batch
    from toolchain.distill.evaluate import evaluate
    from toolchain.distill.loop import distill
    from toolchain.models.load import load_model

    torch.set_num_threads(THREADS)
    teacher, train, held = _data()
    student = load_model(student_dir).model
    blocks = _ordered_blocks(train, steps)
    if run in ("ours", "ours_eager", "sft"):
        cfg = DistillConfig(
            steps=steps,
            batch_size=BATCH,
            lr=LR,
            warmup_steps=WARMUP,
            alpha=1.0 if run == "sft" else 0.0,
            temperature=1.0,
            loss="forward_kl",
            checkpoint_every=10**9,
            seed=SEED,
            threads=THREADS,
            compile=run == "ours",
        )
        with tempfile.TemporaryDirectory() as work:
            res = distill(
                teacher.model,
                student,
                lambda m: Batch.from_blocks(blocks[m * BATCH : (m + 1) * BATCH]),
                held,
                cfg,
                work,
                progress=False,
            )
        step_seconds = [h["seconds"] for h in res["history"]]
        after = res["after"]
    else:
        step_seconds = _train_trl(teacher, student, blocks, steps)
        after = evaluate(student, teacher.model, held)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "run": run,
        "tps": _steady_tps(step_seconds),
        "rss_mb": rss_mb,
        "ce": after["ce"],
        "kl": after["kl"],
        "agree": after["top1_agreement"],
        "teacher_ce": after["teacher_ce"],
        "step_seconds": step_seconds,
    }


def _train_trl(teacher, student, blocks, steps: int) -> list[float]:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.t0, self.seconds = 0.0, []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.seconds.append(time.perf_counter() - self.t0)

    def collate(rows):
        # packed plain text: all positions are loss positions; TRL shifts logits[:, :-1] vs labels[:, 1:]
        # itself, so a 129-token block gives the same 128 targets ours trains on.
        ids = torch.tensor([r["input_ids"] for r in rows])
        ones = torch.ones_like(ids)
        return {
            "input_ids": ids,
            "attention_mask": ones,
            "labels": ids.clone(),
            "prompts": ids[:, :1],
            "prompt_attention_mask": ones[:, :1],
        }

    ds = Dataset.from_dict({"input_ids": blocks.tolist()})
    out = tempfile.mkdtemp(prefix="trl-gkd-")
    args = GKDConfig(
        output_dir=out,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        max_steps=steps,
        lr_scheduler_type="cosine",
        warmup_steps=WARMUP,
        weight_decay=0.0,
        max_grad_norm=1.0,
        lmbda=0.0,
        beta=0.0,
        temperature=2.0,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        seed=SEED,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
        max_length=None,
    )
    times = StepTimes()
    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher.model,
        args=args,
        data_collator=collate,
        train_dataset=ds,
        processing_class=teacher.tokenizer,
        callbacks=[times],
    )
    trainer.train()
    student.eval()
    return times.seconds


def run_env(run: str) -> dict:
    """Process environment of one run: TRL as it starts by default; ours and trl_tuned tuned alike."""
    from toolchain.distill.tuning import process_env

    env = dict(os.environ)
    env.pop("GLIBC_TUNABLES", None)
    return env if run == "trl" else process_env(env, THREADS)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--worker")
    ap.add_argument("--student")
    ap.add_argument("--student-init", help="reuse a 10-block student made by an earlier run of this script")
    ap.add_argument("--partial", help="append each finished run's JSON to this file (long runs on a busy machine)")
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.student, args.steps)))
        return

    from toolchain.config import DataConfig
    from toolchain.distill.run import calibration_blocks
    from toolchain.student import build_student

    teacher, _, held = _data()
    if args.student_init:
        student_dir = Path(args.student_init)
    else:
        student_dir = Path(tempfile.mkdtemp(prefix="kd-vs-trl-")) / "student-init"
        build_student(teacher, student_dir, 10, calibration_blocks(teacher.tokenizer, DataConfig(seq_len=SEQ), 8))
    del teacher
    rows = {}
    for run in args.runs.split(","):
        t0 = time.perf_counter()
        p = subprocess.run(
            [sys.executable, __file__, "--worker", run, "--student", str(student_dir), "--steps", str(args.steps)],
            env=run_env(run),
            capture_output=True,
            text=True,
        )
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not line:
            sys.stderr.write(p.stdout[-3000:] + p.stderr[-3000:])
            raise SystemExit(f"run {run} failed (exit {p.returncode})")
        rows[run] = json.loads(line[-1][7:])
        if args.partial:
            with open(args.partial, "a") as f:
                f.write(json.dumps({**rows[run], "steps": args.steps}) + "\n")
        print(f"  {run}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    print(
        f"teacher smollm2-135m-instruct, 10-block student, {args.steps} steps of {BATCH}x{SEQ} tokens, fp32, "
        f"{THREADS} threads; held-out {held.shape[0]}x{SEQ} tokens"
    )
    print(f"{'run':10s} {'tok/s':>7s} {'peak RSS MB':>12s} {'CE':>7s} {'KL':>7s} {'agree':>7s}")
    for run, r in rows.items():
        print(f"{run:10s} {r['tps']:7.1f} {r['rss_mb']:12.0f} {r['ce']:7.3f} {r['kl']:7.3f} {r['agree']:7.1%}")
    teacher_ce = next(iter(rows.values()))["teacher_ce"]
    print(f"teacher CE {teacher_ce:.3f}")
    out = {"steps": args.steps}
    for run, r in rows.items():
        out.update(
            {
                f"{run}_tps": r["tps"],
                f"{run}_rss_mb": r["rss_mb"],
                f"{run}_kl": r["kl"],
                f"{run}_agree": r["agree"],
                f"{run}_ce": r["ce"],
            }
        )
    if "ours" in rows and "trl" in rows:
        out["ours_vs_trl"] = rows["ours"]["tps"] / rows["trl"]["tps"]
    if "ours" in rows and "trl_tuned" in rows:
        out["ours_vs_trl_tuned"] = rows["ours"]["tps"] / rows["trl_tuned"]["tps"]
    if "ours_eager" in rows and "trl_tuned" in rows:
        out["ours_eager_vs_trl_tuned"] = rows["ours_eager"]["tps"] / rows["trl_tuned"]["tps"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
