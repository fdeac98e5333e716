"""Runtime x quant type x target table for a run directory's exports (default runs/quickstart).

Benchmarks every GGUF in <run>/export, the ONNX folder and the torch baseline (<run>/student) on
the given targets, writes one JSON per row to <run>/bench-targets/, and prints a table. Mobile-class
rows show the emulated figure (this machine pinned to the target's thread count) and the
bandwidth projection to the device. With --from, only prints the table of JSONs already written.

    python benchmarks/bench_table.py [--run runs/quickstart] [--targets cpu,phone-mid,phone-low,rpi5,cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HEADER = (
    f"{'target':10} {'runtime':11} {'quant':7} {'thr':>5} {'pp512':>7} {'pp32':>7} {'decode':>13} "
    f"{'RSS MB':>6} {'size MB':>7} {'ceiling':>7} {'eff':>5} {'projected':>9}  note"
)


def fmt(r: dict) -> str:
    head = f"{r['target']:10} {r['runtime']:11} {r['quant']:7} {str(r['threads']) + '/' + str(r['target_threads']):>5}"
    size = f"{r['bytes'] / 1e6:7.1f}" if r.get("bytes") else f"{'':7}"
    if r.get("skipped") or r.get("fits") is False:
        why = (
            f"skipped: {r['skipped']}"
            if r.get("skipped")
            else f"does not fit: {r['memory_needed_mb']:.0f} MB > {r['memory']['memory_budget_mb']} MB"
        )
        return f"{head} {'-':>7} {'-':>7} {'-':>13} {'-':>6} {size} {'-':>7} {'-':>5} {'-':>9}  {why}"
    d, roof, proj = r["decode_tps"], r["roofline"], r.get("projection")
    note = f"{r['contended_kept']} contended run(s) kept " if r.get("contended_kept") else ""
    if r.get("measured_for") not in (None, r["target"]):
        note += f"(same run as {r['measured_for']})"
    return (
        f"{head} {r['prefill_tps']['median']:7.0f} {r['prefill_short_tps']['median']:7.0f} "
        f"{d['median']:6.1f} ±{d['stddev']:5.1f} {r['peak_rss_mb']:6.0f} {size} {roof['ceiling_tps']:7.0f} "
        f"{roof['efficiency']:5.0%} {format(proj['decode_tps'], '9.1f') if proj else '':>9}  {note}"
    )


def print_table(rows: list[dict]) -> None:
    print(HEADER)
    for r in rows:
        print(fmt(r))
    bw = set()
    for r in rows:
        roof = r.get("roofline") or {}
        if roof.get("bandwidth_source") == "measured":
            bw |= {(r["threads"], roof["bandwidth_gbps"]), (1, roof["bandwidth_1thread_gbps"])}
    print(
        "pp512/pp32: prefill tok/s of a 512/32-token prompt; decode: tok/s of 128 tokens after the prompt "
        "(median ± stddev); thr: threads used here / the target's"
    )
    print("ceiling: measured bandwidth here / weight bytes read per token; eff: decode / ceiling")
    print("measured bandwidth here: " + ", ".join(f"{bw_:.1f} GB/s with {t} thread(s)" for t, bw_ in sorted(bw)))
    print("projected (mobile-class): target profile bandwidth / bytes per token * efficiency here, e.g.")
    for r in rows:
        if r.get("projection"):
            print("  " + r["projection"]["formula"] + f"  [{r['target']} {r['runtime']} {r['quant']}]")
            break


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/quickstart", help="run directory with export/ and student/")
    p.add_argument("--targets", default="cpu,phone-mid,phone-low,rpi5,cuda")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--from", dest="from_dir", help="print the table of an earlier run's JSON files only")
    args = p.parse_args()
    if args.from_dir:
        return print_table([json.loads(f.read_text()) for f in sorted(Path(args.from_dir).glob("*.json"))])

    from toolchain.bench.run import bench_targets, describe_model
    from toolchain.targets import load_target

    run = Path(args.run)
    paths = sorted((run / "export").glob("model-*.gguf")) + [run / "export" / "onnx", run / "student"]
    models = [describe_model(x) for x in paths if x.exists()]
    if not models:
        sys.exit(f"no exports under {run}; run `make demo` first")
    targets = [load_target(t) for t in args.targets.split(",")]
    rows = bench_targets(models, targets, 512, 128, args.runs, out_dir=run / "bench-targets")
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
