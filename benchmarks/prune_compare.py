"""Depth-only vs width vs width + depth vs random-width pruning of SmolLM2, each healed the same way.

From the embedded SmolLM2-135M-Instruct, students at ~50% and ~35% of its parameters are cut:
- depth: whole blocks dropped by the angular rule (`toolchain student`'s rule), full width;
- width: every block kept, hidden channels / heads / MLP neurons cut by activation importance
  (a parameter budget, the widest shape that fits);
- width+depth: the budget search over depths (30, 24, 20, 15 blocks), widest fitting width at
  each, the candidate with the lowest held-out KL kept (as pruned, or after --search-steps
  steps of healing each);
- random width: width+depth's shape, its width structures picked at random (seeded).
Each student is then healed by the same distillation (same steps, data, lr; the teacher's top-k
logits cached once and shared). Held-out CE, KL(teacher || student) and top-1 agreement are
measured with the full vocabulary on the held-out pydoc topics before and after healing. The
~35% width+depth student is exported to GGUF (F16, Q8_0) and ONNX fp32 and checked by the
verifiers with the pipeline's thresholds; with --qad-steps its Q8_0 is checked again after that
many steps of quantization-aware distillation through Q8_0 (quantize.qat, the remedy when the
narrow student's Q8_0 misses the bound).

    .venv/bin/python benchmarks/prune_compare.py [--steps 60] [--search-steps 0] [--qad-steps 0]
        [--threads 2] [--out runs/prune-compare] [--only 'depth 50%,width+depth 50%']

Each student's figures are kept in OUT/<student>/row.json: a rerun with the same --out and
settings reuses them (the run takes ~35 min on 2 cores); --fresh starts over. Prints a table,
then one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from toolchain.config import DataConfig, DistillConfig, PruneConfig, VerifyConfig
from toolchain.data.corpus import train_and_heldout
from toolchain.distill.evaluate import evaluate
from toolchain.distill.heal import make_heal
from toolchain.distill.run import calibration_blocks, distill_student
from toolchain.models.load import count_params, load_model, resolve_model_dir
from toolchain.prune import prune_student


def _figures(ev: dict) -> dict:
    return {k: round(ev[k], 4) for k in ("ce", "kl", "top1_agreement")}


def _variants(full_layers: int, depth_layers: dict[str, int]) -> list[tuple[str, str, dict]]:
    """(name, size tag, prune settings); random width takes width+depth's shape (filled in later)."""
    out = []
    for tag, frac in (("50", 0.5), ("35", 0.35)):
        out.append((f"depth {tag}%", tag, {"layers": depth_layers[tag]}))
        if tag == "50":
            out.append((f"width {tag}%", tag, {"params": frac, "depth": False}))
        out.append((f"width+depth {tag}%", tag, {"params": frac, "depth": True}))
        out.append((f"random width {tag}%", tag, {"importance": "random"}))
    return out


def _depth_for(teacher, frac: float) -> int:
    """Blocks a full-width student keeps to land nearest `frac` of the teacher's parameters."""
    from toolchain.prune.axes import Shape, params_of

    cfg, total = teacher.model.config, count_params(teacher.model)
    full = Shape.of(cfg)
    return min(
        range(2, full.layers + 1),
        key=lambda n: abs(params_of(cfg, dataclasses.replace(full, layers=n)) / total - frac),
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=60, help="healing steps, the same for every student")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--calib", type=int, default=16, help="calibration sequences for importance and the search")
    ap.add_argument("--search-steps", type=int, default=0, help="heal steps per candidate before scoring")
    ap.add_argument("--qad-steps", type=int, default=0, help="Q8_0 QAD steps for the 35%% student's second Q8_0 check")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/prune-compare")
    ap.add_argument("--fresh", action="store_true", help="discard the figures kept in --out")
    ap.add_argument("--only", default="", help="these students alone, e.g. 'depth 50%%,width+depth 50%%'")
    args = ap.parse_args()
    only = {n.strip() for n in args.only.split(",") if n.strip()}
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    out = Path(args.out)
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)

    teacher_dir = resolve_model_dir(args.teacher)
    teacher = load_model(str(teacher_dir))
    total = count_params(teacher.model)
    data = DataConfig(seq_len=128, eval_sequences=16, mode="cache", cache_dir=str(out / "teacher-cache"))
    data = dataclasses.replace(data, max_train_blocks=args.steps * 4)
    heal_cfg = DistillConfig(steps=args.steps, batch_size=4, lr=args.lr, warmup_steps=6, eval_every=0)
    calib = calibration_blocks(teacher.tokenizer, data, args.calib)
    _, held = train_and_heldout(
        teacher.tokenizer, data.source, data.seq_len + 1, data.heldout_fraction, data.seed, data.eval_sequences
    )
    depth_layers = {"50": _depth_for(teacher, 0.5), "35": _depth_for(teacher, 0.35)}
    heal = make_heal(teacher, data, heal_cfg, out / "teacher-cache", echo=lambda m: print(m, flush=True))

    rows: dict[str, dict] = {}
    shapes: dict[str, dict] = {}
    for name, tag, settings in _variants(teacher.model.config.num_hidden_layers, depth_layers):
        if only and name not in only:
            continue
        if settings.get("importance") == "random":
            settings = {**shapes[tag], "importance": "random"}
        slug = name.replace(" ", "-").replace("%", "").replace("+", "-")
        kept = out / slug / "row.json"
        settings_key = [args.steps, args.lr, args.calib, args.search_steps]
        if kept.is_file() and json.loads(kept.read_text()).get("settings") == settings_key:
            rows[name] = json.loads(kept.read_text())["row"]
            if name.startswith("width+depth"):
                shapes[tag] = rows[name]["shape"]
            print(f"{name}: kept from {kept}", flush=True)
            continue
        cfg = PruneConfig(enabled=True, calib_sequences=args.calib, search_steps=args.search_steps, **settings)
        t0 = time.perf_counter()
        rec = prune_student(teacher_dir, out / slug / "pruned", cfg, calib, out / slug / "work", heal=heal)
        prune_s = time.perf_counter() - t0
        if name.startswith("width+depth"):
            shapes[tag] = rec["shape"]
        pruned = load_model(str(out / slug / "pruned"))
        before = _figures(evaluate(pruned.model, teacher.model, held))
        t0 = time.perf_counter()
        distill_student(teacher, out / slug / "pruned", out / slug / "healed", data, heal_cfg, out / slug / "heal")
        heal_s = time.perf_counter() - t0
        healed = load_model(str(out / slug / "healed"))
        after = _figures(evaluate(healed.model, teacher.model, held))
        rows[name] = {
            "shape": rec["shape"],
            "params": rec["params"],
            "ratio": round(rec["params"] / total, 3),
            "before": before,
            "after": after,
            "prune_s": round(prune_s, 1),
            "heal_s": round(heal_s, 1),
            "candidates": rec.get("candidates"),
        }
        kept.write_text(json.dumps({"settings": settings_key, "row": rows[name]}))
        print(f"{name}: {rows[name]}", flush=True)

    export = {}
    if "width+depth 35%" in rows:
        export = _export_and_verify(out / "width-depth-35" / "healed", out / "width-depth-35" / "export")
    if args.qad_steps and export:
        export.update(_qad_q8_and_verify(teacher, out / "width-depth-35", data, heal_cfg, args.qad_steps))
    _print(rows, total, args, export, held.numel())
    j = lambda n: rows[n]["after"]["kl"] if n in rows else None
    p = lambda n, k: rows[n][k] if n in rows else None
    print(
        json.dumps(
            {
                "teacher_params": total,
                "params_50": p("width+depth 50%", "params"),
                "params_35": p("width+depth 35%", "params"),
                "depth_kl_50": j("depth 50%"),
                "width_kl_50": j("width 50%"),
                "width_depth_kl_50": j("width+depth 50%"),
                "random_width_kl_50": j("random width 50%"),
                "depth_kl_35": j("depth 35%"),
                "width_depth_kl_35": j("width+depth 35%"),
                "random_width_kl_35": j("random width 35%"),
                "shape_50": p("width+depth 50%", "shape"),
                "shape_35": p("width+depth 35%", "shape"),
                "heal_steps": args.steps,
                "export_35": export,
                "rows": rows,
                "seconds": round(time.perf_counter() - t_start, 1),
            }
        )
    )


def _export_and_verify(model_dir: Path, out: Path, types=("F16", "Q8_0"), onnx: bool = True) -> dict:
    """GGUF F16 and Q8_0 and ONNX fp32 of a pruned student, each checked against torch with the
    pipeline's default thresholds; a failed check is recorded with its message."""
    from toolchain.errors import VerificationError
    from toolchain.export.gguf import export_gguf
    from toolchain.export.onnx import export_onnx
    from toolchain.verify.gguf import verify_gguf
    from toolchain.verify.onnx import verify_onnx

    v = VerifyConfig()
    res: dict = {}
    for f in export_gguf(model_dir, out, list(types)):
        try:
            r = verify_gguf(model_dir, f["path"], f["quant"], v.prompts, 32, v.max_nmse, v.min_greedy_agreement)
            res[f["quant"]] = {"bytes": f["bytes"], "passed": r["passed"], "nmse_max": r["nmse_max"],
                               "greedy_agreement": r["greedy_agreement"]}  # fmt: skip
        except VerificationError as e:
            res[f["quant"]] = {"bytes": f["bytes"], "passed": False, "failure": str(e)[:300]}
    if not onnx:
        return res
    onnx_rec = export_onnx(model_dir, out / "onnx", ["fp32"])
    try:
        r = verify_onnx(model_dir, out / "onnx", v.prompts, greedy_tokens=32)
        res["onnx fp32"] = {"bytes": onnx_rec["bytes"], "passed": r["passed"], "max_abs_diff": r["max_abs_diff"],
                            "greedy_agreement": r["greedy_agreement"]}  # fmt: skip
    except VerificationError as e:
        res["onnx fp32"] = {"bytes": onnx_rec["bytes"], "passed": False, "failure": str(e)[:300]}
    return res


def _qad_q8_and_verify(teacher, student: Path, data: DataConfig, cfg: DistillConfig, steps: int) -> dict:
    """The healed student distilled on through Q8_0's exact rounding, its Q8_0 verified again."""
    from toolchain.config import QuantizeConfig
    from toolchain.quantize.qat import qad_distill_config, qat_distill

    qad = qad_distill_config(cfg, QuantizeConfig(qat="Q8_0", steps=steps))
    res = qat_distill(teacher, student / "healed", student / "qad-q8_0", data, qad, student / "qad.work", "Q8_0")
    out = _export_and_verify(student / "qad-q8_0", student / "export-qad", types=("Q8_0",), onnx=False)
    out["Q8_0 after QAD"] = out.pop("Q8_0")
    out["Q8_0 after QAD"]["qad"] = {"steps": steps, "kl_before": res["before"]["kl"], "kl_after": res["after"]["kl"]}
    return out


def _print(rows: dict, total: int, args, export: dict, held_tokens: int) -> None:
    print()
    print(f"teacher {args.teacher}: {total / 1e6:.1f} M params; every student healed {args.steps} steps (lr {args.lr})")
    print(f"held-out: {held_tokens} tokens of pydoc topics never trained on; KL(teacher || student), full vocabulary")
    head = f"{'student':20s} {'shape L/h/mlp/q/kv':22s} {'params':>8s} {'ratio':>6s}"
    head += f" {'KL before':>10s} {'KL after':>9s} {'CE after':>9s} {'top-1 after':>12s} {'heal s':>7s}"
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        s = r["shape"]
        shape = "/".join(
            str(s[k])
            for k in ("layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
        )
        print(
            f"{name:20s} {shape:22s} {r['params'] / 1e6:7.1f}M {r['ratio']:6.1%} {r['before']['kl']:10.3f} "
            f"{r['after']['kl']:9.3f} {r['after']['ce']:9.3f} {r['after']['top1_agreement']:12.1%} {r['heal_s']:7.0f}"
        )
    for tag in ("50", "35"):
        if f"width+depth {tag}%" not in rows:
            continue
        cands = rows[f"width+depth {tag}%"]["candidates"] or []
        how = f"after {args.search_steps} healing steps" if args.search_steps else "as pruned, before healing"
        print(f"width+depth {tag}% search (KL {how}): " + ", ".join(
            f"{c['shape']['layers']}L/{c['shape']['hidden_size']}h -> {c['kl']:.3f}" for c in cands
        ))  # fmt: skip
    for q, r in export.items():
        figures = r.get("failure") or ", ".join(
            f"{k} {r[k]:.2e}" for k in ("nmse_max", "max_abs_diff", "greedy_agreement") if k in r
        )
        print(
            f"35% width+depth {q}: {r['bytes'] / 1e6:.1f} MB, verify {'passed' if r['passed'] else 'FAILED'}: {figures}"
        )
        if "qad" in r:
            qad = r["qad"]
            kl = f"{qad['kl_before']:.3f} -> {qad['kl_after']:.3f}"
            print(f"  (QAD Q8_0 {qad['steps']} steps: held-out KL to the teacher {kl})")


if __name__ == "__main__":
    main()
