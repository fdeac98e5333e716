"""The whole pipeline on a tiny random teacher: every stage, the run directory, resume."""

import json

import pytest

from toolchain.config import from_dict
from toolchain.errors import UserError
from toolchain.pipeline import STAGES, run_pipeline


def tiny_config(teacher_dir, **over):
    data = {
        "name": "tiny-student",
        "teacher": {"model": str(teacher_dir)},
        "student": {"keep_layers": 3, "calib_sequences": 2},
        "data": {"seq_len": 32, "eval_sequences": 4},
        "distill": {"steps": 4, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 2},
        # the shipped student trains through Q8_0's rounding for two steps
        "quantize": {"qat": "Q8_0", "steps": 2},
        "export": {"gguf": ["F16", "Q8_0"], "onnx": True, "onnx_precisions": ["fp32", "int8"]},
        # a 4-step tiny random student has flat logits (a third of positions near-ties), where
        # int8 activation rounding flips ties depending on the CPU's kernels; real models are held
        # to the default 0.95 (tests/verify, benchmarks/onnx_verify_figures.py)
        "verify": {"greedy_tokens": 8, "onnx_min_top1": {"int8": 0.9}},
        "bench": {"prompt_tokens": 32, "gen_tokens": 8, "runs": 3},
    }
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v}
    return from_dict(data)


@pytest.fixture(scope="module")
def run_dir(tiny_dir_6, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run_pipeline(tiny_config(tiny_dir_6), out, progress=False, echo=lambda m: None)
    return out


def test_run_directory_layout(run_dir):
    for rel in [
        "config.yaml",
        "report.json",
        "report.md",
        "student/config.json",
        "student/model.safetensors",
        "export/model-F16.gguf",
        "export/model-Q8_0.gguf",
        "export/Modelfile",
        "export/onnx/model.onnx",
        "export/onnx-int8/model.onnx",
        "export/onnx-int8/tokenizer.json",
        "logs/distill_history.json",
        "report.html",
        "bench/llama_cpp-Q8_0-cpu.json",
        "bundle/manifest.json",
        "bundle/gguf/Modelfile",
        "bundle/onnx/int8/genai_config.json",
    ]:
        assert (run_dir / rel).is_file(), rel
    from toolchain.runtime.bundle import Bundle

    m = Bundle.open(run_dir / "bundle").manifest  # every checksum holds
    assert {e["path"] for e in m["models"]} == {"gguf/model-F16.gguf", "gguf/model-Q8_0.gguf", "onnx/fp32", "onnx/int8"}
    assert all(e["memory"]["cpu"]["memory_needed_mb"] > 0 for e in m["models"])  # from the bench stage
    assert "## App bundle" in (run_dir / "report.md").read_text()


def test_report_has_the_stable_keys(run_dir):
    r = json.loads((run_dir / "report.json").read_text())
    assert r["teacher"]["params"] > r["student"]["params"] > 0 and r["student"]["bytes"] > 0
    for k in ("steps", "tokens", "tokens_per_s", "teacher_ce"):
        assert r["distill"][k] is not None
    for when in ("before", "after"):
        assert {"ce", "kl", "top1_agreement"} <= set(r["distill"][when])
    formats = {(e["format"], e["quant"]) for e in r["exports"]}
    assert formats == {("gguf", "F16"), ("gguf", "Q8_0"), ("onnx", "fp32"), ("onnx", "int8")}
    for e in r["exports"]:
        assert e["bytes"] > 0 and len(e["sha256"]) == 64 and e["parity"]["passed"]
    f16 = next(e for e in r["exports"] if e["quant"] == "F16")
    assert f16["parity"]["nmse_max"] < 1e-4 and f16["parity"]["tokenizer_parity"] == 1.0
    assert {(b["runtime"], b["quant"]) for b in r["bench"]} == {
        ("llama_cpp", "F16"),
        ("llama_cpp", "Q8_0"),
        ("onnxruntime", "fp32"),
        ("onnxruntime", "int8"),
        ("torch", "fp32"),
    }
    for b in r["bench"]:
        assert b["decode_tps"]["median"] > 0 and b["prefill_tps"]["median"] > 0 and b["peak_rss_mb"] > 0
        assert b["target"] == "cpu" and b["threads"] >= 1
    stages = {"teacher", "student", "distill", "quantize", "export_gguf", "export_onnx", "verify", "bench", "pack"}
    assert set(r["stage_seconds"]) == stages
    md = (run_dir / "report.md").read_text()
    assert "## Distillation" in md and "## Speed" in md and "## Time per stage" in md


def test_quantize_stage_trains_the_weights_the_file_holds(run_dir):
    import numpy as np
    from gguf.quants import dequantize

    from toolchain.models.file_checks import open_gguf
    from toolchain.models.load import load_model
    from toolchain.quantize.qat import bake, load_scales, trained_rounding

    r = json.loads((run_dir / "report.json").read_text())
    q = r["quantize"]
    assert q["qat"] == "Q8_0" and q["steps"] == 2
    meta = load_model(str(run_dir / "student")).meta  # how it was distilled, and then trained through Q8_0
    assert meta["distilled_steps"] == 4 and meta["qat"] == {  # (Q8_0 blocks start from their reference scales)
        "type": "Q8_0",
        "overrides": {},
        "steps": 2,
        "activations": True,
        "scales": "qat/scales.safetensors",  # quantize.learn_scales (the default)
    }
    assert "## Quantization-aware distillation (Q8_0)" in (run_dir / "report.md").read_text()
    assert (
        q["learn_scales"]
        and "Each block's scale trained too, from the reference start" in (run_dir / "report.md").read_text()
    )
    assert (run_dir / "work" / "student-float" / "model.safetensors").is_file()  # the distilled weights
    gguf_file = open_gguf(run_dir / "export" / "model-Q8_0.gguf")
    assert gguf_file.fields["toolchain.qat.type"].contents() == "Q8_0"
    down = next(t for t in gguf_file.tensors if t.name == "blk.1.ffn_down.weight")
    stored = dequantize(down.data, down.tensor_type).reshape(down.shape[::-1])
    student = load_model(str(run_dir / "student"))  # its latent weights, rounded with its learned scales
    trained_rounding(meta["qat"], load_scales(run_dir / "student", meta["qat"])).apply(student.model)
    bake(student.model)
    assert np.array_equal(stored, student.model.model.layers[1].mlp.down_proj.weight.detach().numpy())


def test_rerun_skips_finished_stages(run_dir, tiny_dir_6):
    before = (run_dir / "export" / "model-F16.gguf").stat().st_mtime_ns
    lines = []
    run_pipeline(tiny_config(tiny_dir_6), run_dir, progress=False, echo=lines.append)
    assert sum("skipped" in line for line in lines) == len(STAGES)  # finetune and eval did nothing, and are done
    assert (run_dir / "export" / "model-F16.gguf").stat().st_mtime_ns == before


def test_rerun_with_other_config_is_refused(run_dir, tiny_dir_6):
    with pytest.raises(UserError, match="different config"):
        run_pipeline(tiny_config(tiny_dir_6, distill={"steps": 5}), run_dir, progress=False, echo=lambda m: None)


def test_failed_verification_fails_the_run(tiny_dir_6, tmp_path):
    cfg = tiny_config(
        tiny_dir_6,
        export={"gguf": ["Q8_0"], "onnx": False},
        verify={"max_nmse": {"default": 1e-12}},
        quantize={"qat": "none"},
    )
    # the error says what would bring the file within bounds: training through its rounding
    with pytest.raises(UserError, match="verification failed.*NMSE.*quantize.qat: Q8_0 in a run"):
        run_pipeline(cfg, tmp_path, progress=False, echo=lambda m: None)
    assert not (tmp_path / "stages" / "verify.json").exists()
    assert json.loads((tmp_path / "logs" / "verify_failed.json").read_text())["results"][0]["passed"] is False


def test_task_flow_fine_tunes_distills_on_the_task_and_scores_every_model(tiny_dir_6, tmp_path):
    rows = [{"prompt": f"Is message {i} spam?", "response": "spam" if i % 2 else "ham", "bucket": "ab"[i % 3 == 0]}
            for i in range(40)]  # fmt: skip
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(
        tiny_dir_6,
        task={"path": str(task), "grader": {"kind": "label", "labels": ["spam", "ham"]}, "min_eval_per_bucket": 1,
              "max_new_tokens": 3, "calib_fraction": 0.3},
        finetune={"enabled": True, "method": "lora", "steps": 4, "batch_size": 4, "lr": 1e-2, "seq_len": 64},
        data={"mode": "task", "seq_len": 64, "gen_temperature": 0, "gen_max_new_tokens": 3},
        distill={"on_policy_fraction": 0.5},  # the student answering the train prompts, the teacher scoring
        export={"gguf": ["F16", "Q4_K_M"], "onnx": False, "imatrix_rows": 4},  # Q4_K_M: with an imatrix
        quantize={"qat": "none"},
        bench={"targets": ["cpu"], "torch_baseline": False},
    )  # fmt: skip
    out = tmp_path / "run"
    run_pipeline(cfg, out, progress=False, echo=lambda m: None)
    r = json.loads((out / "report.json").read_text())
    assert r["finetune"]["method"] == "lora" and (out / "work" / "teacher-finetuned" / "config.json").is_file()
    assert r["teacher"]["finetuned"] and r["distill"]["mode"] == "task" and r["distill"]["targets"] == "teacher"
    models = r["task"]["models"]
    assert list(models) == [
        "base teacher", "teacher", "student, before", "student", "student gguf F16", "student gguf Q4_K_M"
    ]  # fmt: skip
    from toolchain.models.file_checks import open_gguf

    # the task's importance matrix, kept only if the file it weighs measures closer to the F16
    fields = open_gguf(out / "export" / "model-Q4_K_M.gguf").fields
    choice = next(e for e in r["exports"] if e["quant"] == "Q4_K_M")["imatrix"]
    assert choice["tokens"] > 0 and choice["used"] == (choice["imatrix_kld"] <= choice["plain_kld"])
    assert ("quantize.imatrix.chunks_count" in fields) == choice["used"] and (out / "export" / "imatrix.gguf").is_file()
    if choice["used"]:
        assert int(fields["quantize.imatrix.chunks_count"].contents()) == 4
    assert "Q4_K_M: importance matrix" in (out / "report.md").read_text()
    assert models["student gguf F16"]["format"] == "gguf" and models["base teacher"]["format"] == "hf"
    n_eval = len(cfg.task.splits().eval)
    assert all(sum(b["n"] for b in m["score"]["buckets"].values()) == n_eval for m in models.values())
    assert set(r["task"]["retention"]) == {"student, before", "student", "student gguf F16", "student gguf Q4_K_M"}
    md = (out / "report.md").read_text()
    assert "## Task accuracy" in md and "Retention of the teacher's accuracy" in md
    assert {"finetune", "eval"} <= set(r["stage_seconds"])
    # the bundle's fallback threshold, measured on the calibration split
    from toolchain.runtime.bundle import Bundle

    cal = Bundle.open(out / "bundle").manifest["calibration"]
    assert cal["examples"] == len(cfg.task.splits().calib) >= 10 and cal["model"] == "gguf Q4_K_M"  # the smallest
    assert cal["routed_accuracy"] >= cal["teacher_accuracy"] - 0.01 and 0.0 <= cal["coverage"] <= 1.0
    assert r["bundle"]["calibration"]["threshold"] == cal["threshold"]


def test_prune_stage_cuts_width_heals_between_rounds_and_distills_the_pruned_student(tiny_dir_6, tmp_path):
    cfg = tiny_config(
        tiny_dir_6,
        student={"keep_layers": 4},
        prune={"enabled": True, "layers": 3, "hidden_size": 48, "intermediate_size": 96, "rounds": 2,
               "heal_steps": 2, "calib_sequences": 4,
               "again": {"intermediate_size": 64, "steps": 3}},  # and once more after distillation
        export={"gguf": ["F16"], "onnx": False},
        quantize={"qat": "none"},
        verify={"quality_tokens": 0},
        bench={"targets": [], "torch_baseline": False},
    )  # fmt: skip
    out = tmp_path / "run"
    lines: list[str] = []
    run_pipeline(cfg, out, progress=False, echo=lines.append)
    student = json.loads((out / "student" / "config.json").read_text())
    assert (student["num_hidden_layers"], student["hidden_size"], student["intermediate_size"]) == (3, 48, 64)
    r = json.loads((out / "report.json").read_text())
    p, again = r["prune"], r["prune_again"]
    assert [x["shape"]["intermediate_size"] for x in p["rounds"]] == [104, 96]  # geometric steps, multiples of 8
    assert p["rounds"][0]["healed_steps"] == 2 and p["rounds"][0]["params"] > p["rounds"][1]["params"]
    assert (out / "work" / "prune" / "round-1-healed" / "config.json").is_file()
    assert sum("healing round-1" in line for line in lines) == 1
    assert r["student"]["layers"] == 3 and set(r["student"]["kept_layers"]) <= set(range(6))
    assert r["distill"]["after"]["kl"] < r["distill"]["before"]["kl"]
    # the distilled student (p["params"]) cut again to MLP 64, healed for 3 steps, and shipped
    assert again["params_before"] == p["params"] > again["params"] == r["student"]["params"]
    assert again["shape"]["intermediate_size"] == 64 and again["healed"]["steps"] == 3
    import torch
    from safetensors.torch import load_file

    cut, shipped = (load_file(out / d / "model.safetensors") for d in ("work/student-pruned-again", "student"))
    assert not torch.equal(cut["model.layers.0.mlp.down_proj.weight"], shipped["model.layers.0.mlp.down_proj.weight"])
    assert (out / "work" / "student-distilled" / "model.safetensors").is_file()
    assert r["exports"][0]["parity"]["passed"]
    meta = json.loads((out / "student" / "toolchain.json").read_text())
    assert meta["pruning"]["shape"]["intermediate_size"] == 64 and meta["pruned_before"]["shape"]["hidden_size"] == 48
    md = (out / "report.md").read_text()
    assert "## Pruning" in md and "## Pruning again, after distillation" in md
    assert "prune" in r["stage_seconds"] and "prune_again" in r["stage_seconds"]
