"""report.json -> report.md: the tables a person reads first."""

from __future__ import annotations


def _mb(n) -> str:
    return f"{n / 1e6:.1f} MB" if n else "-"


def _f(x, fmt=".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out + [""]


def _quality(report: dict) -> dict:
    out = {}
    for e in report.get("exports", []):
        p = e.get("parity") or {}
        if e["format"] == "gguf" and p:
            out[(e["format"], e["quant"])] = (
                f"NMSE {_f(p.get('nmse_max'), '.1e')}, greedy {_f(p.get('greedy_agreement'), '.0%')}"
            )
        elif p:
            out[(e["format"], e["quant"])] = (
                f"max Δ {_f(p.get('max_abs_diff'), '.1e')}, greedy {_f(p.get('greedy_agreement'), '.0%')}"
            )
    return out


def _bench_table(report: dict, bench: list[dict]) -> list[str]:
    quality = _quality(report)
    first = next((b for b in bench if b.get("decode_tps")), bench[0])
    decode = first.get("decode_tps") or {}
    n_runs = decode.get("n") or len(decode.get("runs", [])) or "?"
    lines = [
        f"prompt {first.get('n_prompt')} tokens, {first.get('n_gen')} generated; median of "
        f"{n_runs} runs after a warm-up, each model in its "
        "own process pinned to the target's core count. Ceiling = memory bandwidth / bytes read per token.",
        "",
    ]
    rows = []
    for b in bench:
        head = [b.get("runtime"), b.get("quant"), b.get("target"), b.get("threads", "-")]
        if b.get("skipped"):
            rows.append(head + [f"skipped: {b['skipped']}"] + [""] * 9)
            continue
        if b.get("fits") is False:
            need = (b.get("memory") or {}).get("memory_needed_mb", b.get("memory_needed_mb"))
            rows.append(head + [f"does not fit: needs {_f(need, '.0f')} MB"] + [""] * 9)
            continue
        roof, proj = b.get("roofline") or {}, b.get("projection") or {}
        rows.append(
            head
            + [
                _f(b["prefill_tps"]["median"], ".0f"),
                _f((b.get("prefill_short_tps") or {}).get("median"), ".0f"),
                f"{_f(b['decode_tps']['median'], '.1f')} ± {_f(b['decode_tps'].get('stddev'), '.1f')}",
                _f(b["ttft_ms"]["median"], ".1f"),
                _f(b.get("peak_rss_mb"), ".0f"),
                _mb(b.get("bytes")),
                quality.get((b.get("format"), b.get("quant")), "-"),
                f"{_f(roof.get('ceiling_tps'), '.0f')} ({_f(roof.get('efficiency'), '.0%')})" if roof else "-",
                _f(proj.get("decode_tps"), ".1f") if proj else "-",
            ]
        )
    lines += _table(
        [
            "runtime",
            "type",
            "target",
            "threads",
            "prefill tok/s",
            "prefill short",
            "decode tok/s",
            "TTFT ms",
            "peak RSS MB",
            "size",
            "quality vs torch",
            "ceiling tok/s (efficiency)",
            "projected decode",
        ],
        rows,
    )
    formulas = {f for b in bench if (f := (b.get("projection") or {}).get("formula")) is not None}
    for f in sorted(formulas):
        lines += [f"Projection (not a measurement): `{f}`", ""]
    return lines


def _models_section(t: dict, s: dict) -> list[str]:
    lines = ["## Models", ""]
    lines += _table(
        ["model", "params", "size (fp32 safetensors)", "layers"],
        [
            [
                f"teacher `{t.get('name', '?')}`",
                f"{(t.get('params') or 0) / 1e6:.1f} M",
                _mb(t.get("bytes")),
                t.get("layers", "-"),
            ],
            [
                "student",
                f"{(s.get('params') or 0) / 1e6:.1f} M",
                _mb(s.get("bytes")),
                f"{s.get('layers')} (teacher blocks {s.get('kept_layers')})",
            ],
        ],
    )
    return lines


_SHAPE_KEYS = ("layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


def _shape(sh: dict) -> str:
    return " / ".join(str(sh.get(k, "-")) for k in _SHAPE_KEYS)


def _prune_section(p: dict, title: str = "Pruning", reference: str = "the unpruned one") -> list[str]:
    """The width/depth cut: shapes, what the kept structures held, candidates of a budget search."""
    lines = [
        f"## {title}",
        "",
        f"Importance: `{p.get('importance')}`" + (f"; budget {p['budget']}" if p.get("budget") else ""),
        "",
    ]
    rows = [["before", _shape(p.get("shape_before") or {}), f"{p.get('params_before', 0) / 1e6:.1f} M", "-"]]
    for i, r in enumerate(p.get("rounds") or [], 1):
        kept = r.get("kept_importance") or {}
        share = ", ".join(f"{k} {v:.0%}" for k, v in kept.items()) or "-"
        healed = f" (healed {r['healed_steps']} steps)" if r.get("healed_steps") else ""
        rows.append([f"round {i}{healed}", _shape(r["shape"]), f"{r['params'] / 1e6:.1f} M", share])
    lines += _table(["", "layers / hidden / MLP / heads / KV heads", "params", "importance kept"], rows)
    lines += [
        f"Held-out KL of the pruned model to {reference}, before distillation: {_f(p.get('heldout_kl'))}",
        "",
    ]
    if p.get("healed"):
        h = p["healed"]
        lines += [
            f"Healed by {h['steps']} distillation steps from the teacher: held-out KL {_f(h['before'].get('kl'))} "
            f"-> {_f(h['after'].get('kl'))}, top-1 agreement {_f(h['after'].get('top1_agreement'), '.1%')}",
            "",
        ]
    if p.get("candidates"):
        cands = [[_shape(c["shape"]), f"{c['params'] / 1e6:.1f} M", _f(c["kl"])] for c in p["candidates"]]
        lines += ["Candidates of the budget search (lowest KL chosen):", ""]
        lines += _table(["layers / hidden / MLP / heads / KV heads", "params", "held-out KL"], cands)
    return lines


def _diverged_section(d: dict) -> list[str]:
    best, last = d.get("best") or {}, d.get("last") or {}
    lines = ["## Distillation: stopped, diverged", "", f"{d.get('reason')}.", ""]
    lines += _table(
        ["", "step", "held-out KL", "held-out CE"],
        [
            ["best", str(best.get("step", "-")), _f(best.get("kl")), _f(best.get("ce"))],
            ["last", str(last.get("step", "-")), _f(last.get("kl")), _f(last.get("ce"))],
        ],
    )
    if d.get("best_student"):
        lines += [f"Best student kept in `{d['best_student']}`.", ""]
    return lines


def _distilled_section(d: dict) -> list[str]:
    b, a = d.get("before", {}), d.get("after", {})
    lines = ["## Distillation (held-out text)", ""]
    lines += [
        f"{d.get('steps')} steps, {d.get('tokens')} tokens, {_f(d.get('tokens_per_s'), '.0f')} tokens/s; "
        f"loss = {d.get('alpha')}·CE + {1 - d.get('alpha', 0):.2g}·T²·KL, T = {d.get('temperature')}",
        "",
    ]
    lines += _table(
        ["metric", "before", "after"],
        [
            ["student CE (nats/token)", _f(b.get("ce")), _f(a.get("ce"))],
            ["KL(teacher ‖ student)", _f(b.get("kl")), _f(a.get("kl"))],
            ["top-1 agreement with teacher", _f(b.get("top1_agreement")), _f(a.get("top1_agreement"))],
            ["teacher CE (reference)", _f(d.get("teacher_ce")), _f(d.get("teacher_ce"))],
        ],
    )
    best = d.get("best") or {}
    if best.get("step") is not None:
        lines += [
            f"Lowest held-out KL at step {best['step']} ({_f(best.get('kl'))}); the saved student is "
            f"step {d.get('last_step', d.get('steps'))}'s.",
            "",
        ]
    return lines


def _distill_section(d: dict) -> list[str]:
    if d.get("diverged"):
        return _diverged_section(d)
    return _distilled_section(d) if d else []


def _qat_section(q: dict) -> list[str]:
    """Quantization-aware distillation: what the rounding cost the student and what training won back."""
    b, a = q.get("before", {}), q.get("after", {})
    lines = [f"## Quantization-aware distillation ({q['qat']})", ""]
    overrides = ", ".join(f"`{k}` {v}" for k, v in (q.get("overrides") or {}).items())
    lines += [
        f"{q.get('steps')} steps with every weight rounded as the {q['qat']} GGUF stores it"
        + (f" (overrides: {overrides})" if overrides else "")
        + "; the exported file holds exactly these weights.",
        "",
    ]
    if q.get("learn_scales"):
        start = q.get("scale_start") or {}
        kl = start.get("kl") or {}
        measured = (
            f" (the student so rounded, KL to itself: {_f(kl.get('imatrix'))} from the importance-weighted "
            f"search, {_f(kl.get('reference'))} from each block's largest weight)"
            if kl
            else ""
        )
        lines += [f"Each block's scale trained too, from the {start.get('chosen', 'reference')} start{measured}.", ""]
    lines += _table(
        ["metric", f"{q['qat']}-rounded, before", "after"],
        [
            ["KL(teacher ‖ student)", _f(b.get("kl")), _f(a.get("kl"))],
            ["top-1 agreement with teacher", _f(b.get("top1_agreement")), _f(a.get("top1_agreement"))],
        ],
    )
    return lines


def _export_parity(e: dict) -> str:
    p = e.get("parity", {})
    if e["format"] == "gguf":
        return (
            f"tokenizer {_f(p.get('tokenizer_parity'), '.0%')}, logit NMSE {_f(p.get('nmse_max'), '.2e')}, "
            f"greedy {_f(p.get('greedy_agreement'), '.0%')}"
        )
    parity = f"max abs Δlogit {_f(p.get('max_abs_diff'), '.2e')}, greedy {_f(p.get('greedy_agreement'), '.0%')}"
    if "top1_agreement" in p:  # int8/int4 are judged on choices, not absolute logits
        parity += f", top-1 {_f(p.get('top1_agreement'), '.1%')}, mean KL {_f(p.get('mean_kl'), '.2e')}"
    return parity


def _exports_section(ex: list[dict]) -> list[str]:
    lines = ["## Exports and parity with the torch model", ""]
    rows = []
    for e in ex:
        p = e.get("parity", {})
        rows.append(
            [
                e["format"],
                e["quant"],
                _mb(e.get("bytes")),
                _export_parity(e) if p else "not verified",
                "pass" if p.get("passed") else ("-" if not p else "FAIL"),
                f"`{e['sha256'][:12]}`",
            ]
        )
    lines += _table(["format", "type", "size", "parity", "verdict", "sha256"], rows)
    lines += _imatrix_lines(ex)
    sample = next((e.get("sample") for e in ex if e.get("sample")), None)
    if sample:
        lines += ["Sample (greedy, llama.cpp):", "", "```", sample["prompt"] + sample["llama_cpp"], "```", ""]
    return lines


def _imatrix_lines(ex: list[dict]) -> list[str]:
    """Per GGUF type, whether the importance matrix was kept, with the figures that decided it."""
    lines = []
    for e in ex:
        c = e.get("imatrix")
        if c:
            verdict = "kept" if c["used"] else "left out"
            lines.append(f"- {e['quant']}: importance matrix {verdict} (mean KLD to the F16 file on "
                         f"{c['tokens']} calibration tokens: {c['imatrix_kld']:.4f} with it, "
                         f"{c['plain_kld']:.4f} without)")  # fmt: skip
    return lines + [""] if lines else []


def _task_section(task: dict, finetune: dict) -> list[str]:
    """Accuracy per capability bucket of every model on the eval split, and what the students keep."""
    models = task["models"]
    buckets = sorted({b for m in models.values() for b in m["score"]["buckets"]})
    lines = ["## Task accuracy", ""]
    if finetune.get("path"):
        lines += [
            f"Teacher fine-tuned ({finetune['method']}, {finetune['steps']} steps on {finetune['examples']} examples): "
            f"answer loss {finetune['loss_first10']:.3f} -> {finetune['loss_last10']:.3f}.",
            "",
        ]
    n = {b: next(m["score"]["buckets"][b]["n"] for m in models.values() if b in m["score"]["buckets"]) for b in buckets}
    lines += [f"{task['examples']} eval examples, never trained on (per bucket: "
              + ", ".join(f"{b} {n[b]}" for b in buckets) + ").", ""]  # fmt: skip
    rows = []
    for name, m in models.items():
        acc = [_f(m["score"]["buckets"].get(b, {}).get("accuracy"), ".1%") for b in buckets]
        rows.append(
            [name, f"{m['format']} {m['quant']}", *acc, _f(m["score"]["macro"], ".1%"), _f(m["score"]["micro"], ".1%")]
        )
    lines += _table(["model", "file", *buckets, "macro", "micro"], rows)
    if task.get("retention"):
        lines += ["", f"Retention of the {task['reference']}'s accuracy:", ""]
        rows = [[name, _f(r["macro"], ".1%"), _f(r["min_bucket"], ".1%")] for name, r in task["retention"].items()]
        lines += _table(["student", "macro", "lowest bucket"], rows)
    return lines + [""]


def render(report: dict) -> str:
    t, s, d = report.get("teacher", {}), report.get("student", {}), report.get("distill", {})
    lines = [f"# {report.get('name', 'run')}: distill-and-compress report", ""]
    lines += [f"toolchain {report.get('toolchain_version')} · {report.get('created')}", ""]
    lines += _models_section(t, s)
    if report.get("prune"):
        lines += _prune_section(report["prune"])
    if report.get("prune_again"):
        lines += _prune_section(report["prune_again"], "Pruning again, after distillation", "the distilled student")
    lines += _distill_section(d)
    if (report.get("quantize") or {}).get("qat"):
        lines += _qat_section(report["quantize"])

    ex = report.get("exports", [])
    if ex:
        lines += _exports_section(ex)
    if (report.get("task") or {}).get("models"):
        lines += _task_section(report["task"], report.get("finetune") or {})

    bench = report.get("bench", [])
    if bench:
        lines += ["## Speed", ""]
        lines += _bench_table(report, bench)

    b = report.get("bundle") or {}
    if b.get("path"):
        lines += ["## App bundle", ""]
        lines += [
            f"`{b['path']}`: {', '.join(b['models'])}; {b['files']} files, {b['bytes'] / 1e6:.1f} MB, "
            "each listed with its sha256 in manifest.json (`toolchain inspect` checks them).",
            "",
        ]

    secs = report.get("stage_seconds", {})
    if secs:
        lines += ["## Time per stage", ""]
        lines += _table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in secs.items()])
    return "\n".join(lines)
