"""Which teacher blocks should a depth-pruned student keep? Stride vs the angular rule.

Loads the embedded SmolLM2-135M-Instruct, makes a student of K blocks with each rule, and
measures held-out CE / KL(teacher || student) / top-1 agreement before any training, plus the
time each rule takes. Prints a table, then one JSON line.

    .venv/bin/python benchmarks/student_selection.py [--keep 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from toolchain.config import DataConfig
from toolchain.data.corpus import train_and_heldout
from toolchain.distill.evaluate import evaluate
from toolchain.distill.run import calibration_blocks
from toolchain.models.load import load_model
from toolchain.student import make_student


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--teacher", default="smollm2-135m-instruct")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    teacher = load_model(args.teacher)
    data = DataConfig()
    calib = calibration_blocks(teacher.tokenizer, data, 8)
    _, held = train_and_heldout(
        teacher.tokenizer, data.source, data.seq_len + 1, data.heldout_fraction, data.seed, data.eval_sequences
    )
    rows = {}
    for rule in ("stride", "angular"):
        t0 = time.perf_counter()
        student, keep = make_student(teacher, args.keep, calib, rule)
        secs = time.perf_counter() - t0
        ev = evaluate(student, teacher.model, held)
        rows[rule] = {
            "kept": keep,
            "seconds": round(secs, 1),
            **{k: round(v, 4) for k, v in ev.items() if k != "tokens"},
        }

    print(f"teacher {args.teacher}, student {args.keep} blocks, held-out {held.numel()} tokens")
    print(f"{'rule':8s} {'CE':>7s} {'KL':>7s} {'agree':>6s} {'secs':>6s}  kept blocks")
    for rule, r in rows.items():
        print(f"{rule:8s} {r['ce']:7.3f} {r['kl']:7.3f} {r['top1_agreement']:6.1%} {r['seconds']:6.1f}  {r['kept']}")
    print(f"teacher CE {rows['angular']['teacher_ce']:.3f}")
    print(
        json.dumps(
            {
                "keep": args.keep,
                "stride_ce": rows["stride"]["ce"],
                "angular_ce": rows["angular"]["ce"],
                "stride_kl": rows["stride"]["kl"],
                "angular_kl": rows["angular"]["kl"],
                "teacher_ce": rows["angular"]["teacher_ce"],
                "angular_seconds": rows["angular"]["seconds"],
                "angular_kept": rows["angular"]["kept"],
            }
        )
    )


if __name__ == "__main__":
    main()
