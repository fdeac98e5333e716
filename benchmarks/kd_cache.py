"""Offline teacher cache vs online KD: same student init, same data order, same steps.

Teacher: the embedded SmolLM2-135M-Instruct. Student: the quickstart's 10-block angular-pruned
init. Three runs from that one init, on the same training blocks in the same seeded order:
- online: the teacher runs every step (dense logits);
- cache k=16 and k=64: the teacher's top-k log-probs are stored once (fp16, uint16 ids), then
  training runs with the teacher *not passed to the loop* (teacher=None).
Loss: forward KL at T=1 (alpha 0), the objective a top-k + tail-bucket target represents
exactly on its k+1 buckets. Every run is then evaluated the same way, against the full dense
teacher on the held-out blocks: CE, KL(teacher || student), top-1 agreement.

Prints a table and, last, one JSON object. Run it alone (figures are timings):

    flock /tmp/toolchain-measure.lock .venv/bin/python benchmarks/kd_cache.py [--steps 60] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from toolchain.config import DataConfig, DistillConfig
from toolchain.data.corpus import train_and_heldout
from toolchain.distill.cache import TeacherCache, build_cache, cache_batch_fn, teacher_digest
from toolchain.distill.evaluate import evaluate
from toolchain.distill.loop import distill, packed_batches
from toolchain.distill.run import calibration_blocks
from toolchain.models.load import load_model
from toolchain.student import build_student


def slice_cache(src: Path, dst: Path, k: int) -> dict:
    """A top-k cache from a larger one: the first k stored columns, same fingerprint but k."""
    from safetensors.torch import load_file, save_file

    m = json.loads((src / "manifest.json").read_text())
    dst.mkdir(parents=True, exist_ok=True)
    for name in m["shards"]:
        t = load_file(str(src / name))
        t["topk_ids"] = t["topk_ids"][..., :k].contiguous()
        t["topk_logprobs"] = t["topk_logprobs"][..., :k].contiguous()
        save_file(t, str(dst / name))
    total = sum((dst / n).stat().st_size for n in m["shards"])
    m = {
        **m,
        "k": k,
        "fingerprint": {**m["fingerprint"], "k": k},
        "bytes": total,
        "bytes_per_token": total / (m["blocks"] * m["seq_len"]),
    }
    (dst / "manifest.json").write_text(json.dumps(m))
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ks", default="16,64")
    ap.add_argument("--teacher", default="smollm2-135m-instruct")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]

    teacher = load_model(args.teacher)
    data = DataConfig(seq_len=args.seq_len)
    # exactly the blocks the run consumes (one epoch), so the cache holds nothing unused
    n_blocks = args.steps * args.batch_size
    train, held = train_and_heldout(
        teacher.tokenizer,
        data.source,
        data.seq_len + 1,
        data.heldout_fraction,
        data.seed,
        data.eval_sequences,
        max_train_blocks=n_blocks,
    )
    cfg = DistillConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=6,
        alpha=0.0,
        temperature=1.0,
        loss="forward_kl",
        checkpoint_every=10_000,
        threads=args.threads,
    )
    tmp = Path(tempfile.mkdtemp(prefix="kd_cache_"))
    calib = calibration_blocks(teacher.tokenizer, data, 8)
    init = build_student(teacher, tmp / "init", 10, calib, "angular")
    tid = teacher_digest(teacher.path)

    def fresh_student():
        return load_model(str(tmp / "init")).model

    rows = {}
    before = evaluate(fresh_student(), teacher.model, held)

    print(f"student init {init['kept_layers']}: KL {before['kl']:.4f}", flush=True)
    # online KD
    student = fresh_student()
    res = distill(
        teacher.model,
        student,
        packed_batches(train, cfg.batch_size, cfg.seed),
        held,
        cfg,
        tmp / "w_online",
        progress=False,
    )
    rows["online"] = {
        "tps": res["tokens_per_s"],
        "bytes_per_token": None,
        "build_s": None,
        **evaluate(student, teacher.model, held),
    }
    del student

    print(
        f"online: KL {rows['online']['kl']:.4f}, agreement {rows['online']['top1_agreement']:.1%}, "
        f"{rows['online']['tps']:.1f} tok/s",
        flush=True,
    )

    # The teacher runs once, at the largest k; a smaller k is the first k columns of it (top-k
    # log-probs are stored sorted, normalised over the full vocabulary), written as its own
    # cache so its size on disk is measured, not computed.
    kmax = max(ks)
    t0 = time.perf_counter()
    m = build_cache(
        teacher.model, teacher.tokenizer, train, tmp / f"cache{kmax}", kmax, tid, batch_size=args.batch_size
    )
    build_s = time.perf_counter() - t0
    hm = build_cache(teacher.model, teacher.tokenizer, held, tmp / f"held{kmax}", kmax, tid, batch_size=args.batch_size)
    for k in sorted(ks, reverse=True):
        if k != kmax:
            m = slice_cache(tmp / f"cache{kmax}", tmp / f"cache{k}", k)
            hm = slice_cache(tmp / f"held{kmax}", tmp / f"held{k}", k)
        cache = TeacherCache(tmp / f"cache{k}", expect=m["fingerprint"])
        hcache = TeacherCache(tmp / f"held{k}", expect=hm["fingerprint"])
        held_batches = [hcache.batch(range(i, min(i + 4, len(hcache)))) for i in range(0, len(hcache), 4)]
        student = fresh_student()
        res = distill(
            None,
            student,
            cache_batch_fn(cache, cfg.batch_size, cfg.seed),
            held_batches,
            cfg,
            tmp / f"w_cache{k}",
            progress=False,
        )
        rows[f"cache k={k}"] = {
            "tps": res["tokens_per_s"],
            "bytes_per_token": m["bytes_per_token"],
            "build_s": build_s,
            "cache_mb": m["bytes"] / 1e6,
            "sparse_kl_in_loop": res["after"]["kl"],
            **evaluate(student, teacher.model, held),
        }
        r = rows[f"cache k={k}"]
        print(
            f"cache k={k}: KL {r['kl']:.4f} ({r['kl'] / rows['online']['kl']:.3f} x online), agreement "
            f"{r['top1_agreement']:.1%}, {r['tps']:.1f} tok/s, {r['bytes_per_token']:.1f} B/token",
            flush=True,
        )
        del student

    on = rows["online"]["kl"]
    print(
        f"teacher {args.teacher}; student 10 blocks {init['kept_layers']}; {args.steps} steps x "
        f"{args.batch_size}x{args.seq_len} tokens, forward KL T=1, lr {args.lr}, {args.threads} threads; "
        f"held-out {held.numel() - len(held)} tokens; before training KL {before['kl']:.3f}, "
        f"agreement {before['top1_agreement']:.1%}"
    )
    print(
        f"{'run':12s} {'KL':>7s} {'KL/online':>9s} {'agree':>6s} {'CE':>7s} {'tok/s':>7s} {'B/token':>8s} "
        f"{'cache MB':>8s} {'build s':>8s}"
    )
    for name, r in rows.items():
        bpt = f"{r['bytes_per_token']:.1f}" if r["bytes_per_token"] else "-"
        mb = f"{r['cache_mb']:.1f}" if r.get("cache_mb") else "-"
        bs = f"{r['build_s']:.1f}" if r["build_s"] else "-"
        print(
            f"{name:12s} {r['kl']:7.3f} {r['kl'] / on:9.3f} {r['top1_agreement']:6.1%} {r['ce']:7.3f} "
            f"{r['tps']:7.1f} {bpt:>8s} {mb:>8s} {bs:>8s}"
        )
    out = {
        "steps": args.steps,
        "before_kl": before["kl"],
        "online_kl": on,
        "online_agree": rows["online"]["top1_agreement"],
        "online_tps": rows["online"]["tps"],
    }
    for k in ks:
        r = rows[f"cache k={k}"]
        out.update(
            {
                f"k{k}_kl": r["kl"],
                f"k{k}_kl_ratio": r["kl"] / on,
                f"k{k}_agree": r["top1_agreement"],
                f"k{k}_tps": r["tps"],
                f"k{k}_bytes_per_token": r["bytes_per_token"],
                f"k{k}_build_s": r["build_s"],
            }
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
