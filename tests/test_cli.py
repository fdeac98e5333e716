"""Bad input: one line on stderr, non-zero exit, no traceback (unless --debug)."""

import shutil

import pytest

from toolchain.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, pattern):
    import re

    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in err


def test_missing_config_file(capsys, tmp_path):
    code, _, err = run(capsys, "run", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "config file not found")


def test_unknown_config_key_lists_valid_ones(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("distill:\n  step: 3\n")
    code, _, err = run(capsys, "run", str(cfg), "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, r"unknown config key 'distill.step'.*valid keys here: steps, batch_size")


def test_wrong_value_type_via_set(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    code, _, err = run(capsys, "run", str(cfg), "--out", str(tmp_path / "r"), "--set", "distill.batch_size=four")
    assert_one_line_error(code, err, "distill.batch_size: expected int")


def test_missing_teacher_path(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"teacher:\n  model: {tmp_path}/no-such-model\n")
    code, _, err = run(capsys, "run", str(cfg), "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "model not found")


def test_unwritable_out(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    code, _, err = run(capsys, "run", str(cfg), "--out", str(blocker / "run"))
    assert_one_line_error(code, err, "cannot write to run directory")


def test_tokenizer_mismatch(capsys, tmp_path, tiny_dir, tiny_dir_6):
    import shutil

    from transformers import AutoTokenizer

    student = tmp_path / "student"
    shutil.copytree(tiny_dir, student)
    tok = AutoTokenizer.from_pretrained(student)
    tok.add_tokens(["<unseen>"])
    tok.save_pretrained(student)
    code, _, err = run(
        capsys,
        "distill",
        "--teacher",
        str(tiny_dir_6),
        "--student",
        str(student),
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
    )
    assert_one_line_error(code, err, "tokenizers differ")


def test_debug_shows_the_traceback(tmp_path):
    from toolchain.errors import UserError

    with pytest.raises(UserError):
        main(["--debug", "run", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "r")])


def test_export_and_inspect_commands(capsys, tmp_path, tiny_dir):
    code, out, _ = run(capsys, "export", "gguf", str(tiny_dir), "--out", str(tmp_path), "--types", "Q8_0")
    assert code == 0 and (tmp_path / "model-Q8_0.gguf").is_file() and (tmp_path / "Modelfile").is_file()
    code, out, _ = run(capsys, "inspect", str(tmp_path / "model-Q8_0.gguf"))
    assert code == 0 and '"architecture": "llama"' in out and '"Q8_0"' in out
    code, _, err = run(capsys, "inspect", str(tmp_path / "missing.gguf"))
    assert_one_line_error(code, err, "path not found")
    code, _, err = run(capsys, "bench", str(tmp_path / "Modelfile"))
    assert_one_line_error(code, err, "expected a .gguf file or an ONNX folder")


@pytest.mark.parametrize(
    "cmd",
    [
        ["run"],
        ["finetune"],
        ["eval"],
        ["student"],
        ["distill"],
        ["prune"],
        ["export", "gguf"],
        ["export", "onnx"],
        ["verify"],
        ["bench"],
        ["inspect"],
        ["report"],
    ],
)
def test_every_command_has_help(capsys, cmd):
    with pytest.raises(SystemExit) as e:
        main(cmd + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: toolchain" in out
    if cmd not in (["inspect"], ["report"]):
        assert "--set KEY=VALUE" in out  # every command that has settings takes the config's way


def test_flag_defaults_are_the_config_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(config bench.runs; default 5)" in out and "(config bench.prompt_tokens; default 512)" in out


def test_a_numeric_teacher_name_stays_a_name(capsys, tmp_path):
    code, _, err = run(capsys, "student", "--teacher", "2024", "--out", str(tmp_path / "s"))
    assert_one_line_error(code, err, "model not found: '2024'")


def test_export_and_bench_take_config_and_set(capsys, tmp_path, tiny_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("export:\n  gguf: [Q8_0]\nbench:\n  runs: 2\n")
    code, _, err = run(capsys, "export", "gguf", str(tiny_dir), "--out", str(tmp_path / "e"), "--config", str(cfg))
    assert_one_line_error(code, err, "bench.runs must be >= 3")  # the whole config is validated up front
    code, _, _ = run(
        capsys, "export", "gguf", str(tiny_dir), "--out", str(tmp_path / "e"), "--config", str(cfg),
        "--set", "bench.runs=3", "--set", "export.gguf=[F16]", "--no-modelfile",
    )  # fmt: skip
    assert code == 0 and sorted(p.name for p in (tmp_path / "e").glob("*.gguf")) == ["model-F16.gguf"]
    code, _, err = run(capsys, "bench", str(tmp_path / "e" / "model-F16.gguf"), "--set", "bench.targets=[nowhere]")
    assert_one_line_error(code, err, "nowhere")


def test_distill_from_jsonl_pairs_needs_no_teacher(capsys, tmp_path, tiny_dir):
    # data.mode=sequences with a user's JSONL: the teacher named here does not even exist,
    # so this passes only if the stage never loads it
    import json

    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(24)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = run(
        capsys,
        "distill",
        "--teacher",
        str(tmp_path / "no-such-teacher"),
        "--student",
        str(tiny_dir),
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
        "--set",
        "data.mode=sequences",
        "--set",
        f"data.pairs={pairs}",
        "--set",
        "distill.steps=2",
        "--set",
        "distill.batch_size=2",
        "--set",
        "data.seq_len=96",
        "--set",
        "data.eval_sequences=2",
    )
    assert code == 0, err
    res = json.loads(out[out.index("{") :])
    assert res["mode"] == "sequences" and res["steps"] == 2
    assert (tmp_path / "o" / "config.json").is_file()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_distill_on_a_gpu_that_is_not_there(capsys, tmp_path, tiny_dir):
    code, _, err = run(
        capsys,
        "distill",
        "--teacher",
        str(tiny_dir),
        "--student",
        str(tiny_dir),
        "--out",
        str(tmp_path / "s"),
        "--device",
        "cuda",
    )
    assert_one_line_error(code, err, "distill.device: cuda, but torch sees no CUDA GPU.*set distill.device: cpu")
    assert not (tmp_path / "s").exists()


def test_malformed_pairs_file_is_refused_before_any_stage(capsys, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": \n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  mode: sequences\n  pairs: {pairs}\n")
    out = tmp_path / "run"
    code, _, err = run(capsys, "run", str(cfg), "--out", str(out))
    assert_one_line_error(code, err, r"pairs.jsonl:2: malformed JSON")
    assert not (out / "stages").exists()  # no stage ran


def test_missing_adapter_is_refused_at_load(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"teacher:\n  adapter: {tmp_path / 'no-adapter'}\n")
    code, _, err = run(capsys, "run", str(cfg), "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, r"teacher.adapter: .* is not a PEFT adapter directory")


@pytest.mark.parametrize("command", ["bench", "inspect", "verify"])
def test_corrupt_onnx_is_one_line(command, capsys, tmp_path, tiny_dir):
    folder = tmp_path / "onnx"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"\x08\x07garbage that is not a protobuf" * 10)
    (folder / "model_info.json").write_text("{}")
    shutil.copy(tiny_dir / "tokenizer.json", folder)  # bench tokenizes its prompt first
    argv = {
        "bench": ["bench", str(folder), "--runs", "3"],
        "inspect": ["inspect", str(folder)],
        "verify": ["verify", str(tiny_dir), str(folder)],
    }[command]
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, r"is not a readable ONNX model")


def test_task_commands_refuse_bad_task_input(capsys, tmp_path, tiny_dir):
    code, _, err = run(capsys, "finetune", "--teacher", str(tiny_dir), "--out", str(tmp_path / "ft"))
    assert_one_line_error(code, err, "finetune needs the task's examples: --task")
    code, _, err = run(capsys, "eval", str(tiny_dir), "--task", str(tmp_path / "none.jsonl"))
    assert_one_line_error(code, err, "task.path: file not found")
    task = tmp_path / "t.jsonl"
    task.write_text('{"prompt": "a", "response": "spam"}\n{"prompt": "b"}\n')
    code, _, err = run(capsys, "eval", str(tiny_dir), "--task", str(task))
    assert_one_line_error(code, err, r"t.jsonl:2: missing key 'response'")
    code, _, err = run(capsys, "eval", str(tiny_dir), "--task", str(task), "--set", "task.grader.kind=label")
    assert_one_line_error(code, err, "the label grader needs its label set")


def test_eval_command_scores_each_model(capsys, tmp_path, tiny_dir):
    import json

    task = tmp_path / "t.jsonl"
    rows = [{"prompt": f"question {i}", "response": "yes" if i % 2 else "no", "bucket": "ab"[i % 2]} for i in range(12)]
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["eval", str(tiny_dir), "--task", str(task), "--max-new-tokens", "4", "--json", str(tmp_path / "e.json")]
    code, out, err = run(capsys, *argv, "--set", "task.min_eval_per_bucket=1")
    assert code == 0 and "task accuracy on the eval split" in err
    scores = json.loads(out)
    (only,) = scores.values()
    assert set(only["buckets"]) == {"a", "b"} and 0.0 <= only["macro"] <= 1.0
    saved = json.loads((tmp_path / "e.json").read_text())
    assert len(next(iter(saved.values()))["answers"]) == sum(b["n"] for b in only["buckets"].values())


def test_prune_command_cuts_to_a_budget_and_refuses_bad_goals(capsys, tmp_path, tiny_dir):
    import json

    small = ["--set", "data.seq_len=32", "--set", "prune.calib_sequences=4"]
    code, out, err = run(capsys, "prune", str(tiny_dir), "--out", str(tmp_path / "p"), "--params", "0.7", *small)
    assert code == 0, err
    rec = json.loads(out)
    assert rec["params"] <= 0.7 * rec["params_before"] and len(rec["candidates"]) >= 2
    assert (tmp_path / "p" / "config.json").is_file()
    bad = [
        (["--num-attention-heads", "3"], "not a multiple of num_key_value_heads=2"),
        (["--params", "1K"], "no candidate shape fits"),
        (["--params", "lots"], "count like 40M"),
        ([], "needs a goal"),
    ]
    for flags, message in bad:
        code, _, err = run(capsys, "prune", str(tiny_dir), "--out", str(tmp_path / "q"), *flags, *small)
        assert_one_line_error(code, err, message)
