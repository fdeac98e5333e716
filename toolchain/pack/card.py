"""The bundle's model card (README.md): what it is, how well it does its task, how to run it."""

from __future__ import annotations


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.1f} MB"


def _files_table(manifest: dict) -> list[str]:
    lines = ["| model | runtime | size | memory needed (bench targets) |", "|---|---|---|---|"]
    for m in manifest["models"]:
        mem = ", ".join(f"{t}: {v['memory_needed_mb']:.0f} MB" for t, v in m["memory"].items()) or "not benched"
        lines.append(f"| `{m['path']}` ({m['format']} {m['quant']}) | {m['runtime']} | {_mb(m['bytes'])} | {mem} |")
    return lines


def _task_table(task: dict) -> list[str]:
    models = task["models"]
    buckets = sorted({b for s in models.values() for b in s["buckets"]})
    lines = ["| model | " + " | ".join(buckets) + " | macro |", "|---|" + "---|" * (len(buckets) + 1)]
    for name, s in models.items():
        cells = [f"{s['buckets'][b]['accuracy']:.1%}" if b in s["buckets"] else "-" for b in buckets]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {s['macro']:.1%} |")
    return lines


def _calibration(cal: dict) -> list[str]:
    return [
        "## Confidence and teacher fallback",
        "",
        f"Confidence: {cal['confidence']}, temperature {cal['temperature']:.3f} fitted on the calibration split "
        f"(ECE {cal['ece_before']:.3f} -> {cal['ece_after']:.3f}).",
        f"Threshold {cal['threshold']:.4f}: answers below it go to the fallback "
        f"({cal['target']}; on the calibration split {cal['coverage']:.1%} answered by the student "
        f"at {cal['accuracy_answered']:.1%} accuracy).",
        "",
    ]


def model_card(manifest: dict) -> str:
    p = manifest["provenance"]
    teacher, data = p["teacher"], p["data"]
    gen = manifest["generation"]
    out = [
        f"# {manifest['name']}",
        "",
        f"A {manifest['architecture']} student distilled from **{teacher['name'] or 'its teacher'}** by toolchain "
        f"{p['toolchain_version']}, for {'the task in ' + str(data['source']) if data.get('source') else 'text'}. "
        "Every model file here was checked against the torch model it came from (verify figures in manifest.json).",
        "",
        "## Files",
        "",
        *_files_table(manifest),
        "",
        f"Context: {manifest['context_length']} tokens. Generation: temperature {gen['temperature']}, "
        f"at most {gen['max_new_tokens']} new tokens, stop at {', '.join(map(str, gen['stop_strings']))}.",
        "",
    ]
    if manifest.get("task"):
        out += ["## Task accuracy (eval split, never trained on)", "", *_task_table(manifest["task"]), ""]
    if manifest.get("calibration"):
        out += _calibration(manifest["calibration"])
    out += [
        "## Run it",
        "",
        "- llama.cpp / LM Studio: open the `.gguf` under `gguf/`; Ollama: `ollama create NAME -f gguf/Modelfile`.",
        "- onnxruntime-genai: `onnxruntime_genai.Model('onnx/<precision>')` (genai_config.json is beside the model).",
        "- Python, with checksums checked and the teacher fallback: `toolchain.runtime.bundle.Bundle.open(path)`.",
        "",
        "## Limitations",
        "",
        "- Measured only on the eval split above; a distilled student is narrower than its teacher outside its task.",
        "- Quantized files differ slightly from the torch model (figures in manifest.json under each model's verify).",
        "",
        "## Licence and provenance",
        "",
        f"- Teacher: {teacher['name']} (sha256 {teacher['sha256'] or 'unknown'}), "
        f"licence {teacher['license'] or 'unknown'}; the teacher's licence terms usually apply to a model "
        "distilled from it.",
        f"- Data: {data.get('source') or 'unknown'} (sha256 {data.get('sha256') or 'unknown'}), licence "
        f"{data.get('license') or 'unknown'}.",
        "- Files and checksums: manifest.json (its own digest in manifest.sha256).",
        "",
    ]
    return "\n".join(out)
