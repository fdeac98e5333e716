from pathlib import Path

import pytest

from toolchain.config import Config, apply_override, dump_yaml, from_dict, load_config
from toolchain.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_valid():
    cfg = from_dict({})
    assert isinstance(cfg, Config)
    assert cfg.student.keep_layers == 10


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_validates(example, tmp_path):
    import json

    import yaml

    raw = yaml.safe_load(example.read_text())
    overrides = []
    named = (raw.get("task") or {}).get("path")
    if named and not (ROOT / named).is_file():
        # its data is built by `make task-data`; a few lines of the same shape stand in for it here
        labels = raw["task"]["grader"].get("labels") or ["yes"]
        rows = [
            {"prompt": f"example {i}", "response": labels[i % len(labels)], "bucket": f"b{i % 2}"} for i in range(40)
        ]
        (tmp_path / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        overrides = [f"task.path={tmp_path / 'task.jsonl'}"]
    cfg = load_config(example, overrides)
    assert from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg  # round-trips


def test_unknown_key_lists_valid_keys():
    with pytest.raises(UserError, match=r"unknown config key 'distill.stpes'.*valid keys here: .*steps"):
        from_dict({"distill": {"stpes": 3}})


def test_unknown_section():
    with pytest.raises(UserError, match=r"unknown config key 'distil'.*distill"):
        from_dict({"distil": {}})


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(UserError, match=r"distill.steps: expected int, got str 'ten'"):
        from_dict({"distill": {"steps": "ten"}})


def test_int_accepted_for_float_but_bool_not_for_int():
    assert from_dict({"distill": {"lr": 1}}).distill.lr == 1.0
    with pytest.raises(UserError, match="distill.steps"):
        from_dict({"distill": {"steps": True}})


def test_keep_layers_int_or_list():
    assert from_dict({"student": {"keep_layers": [0, 5, 9]}}).student.keep_layers == [0, 5, 9]
    with pytest.raises(UserError, match="keep_layers"):
        from_dict({"student": {"keep_layers": "many"}})


@pytest.mark.parametrize(
    "section,key,value,msg",
    [
        ("distill", "alpha", 1.5, "between 0 and 1"),
        ("distill", "temperature", 0, "must be > 0"),
        ("bench", "runs", 1, ">= 3"),
        ("export", "gguf", ["Q9_9"], "not one of"),
        ("teacher", "dtype", "int3", "not one of"),
        ("data", "source", "/no/such/file.txt", "neither 'pydoc' nor an existing"),
        ("distill", "grad_clip", 0, "must be > 0"),
        ("distill", "weight_decay", -0.1, "must be >= 0"),
        ("distill", "seed", -1, "must be >= 0"),
        ("student", "keep_layers", [0, -1], "start at 0"),
        ("verify", "max_nmse", {"Q8": 1e-3}, "max_nmse key: 'Q8' is not one of"),
        ("verify", "onnx_min_top1", {"int4": 1.5}, "fraction between 0 and 1"),
        ("verify", "max_ppl_ratio", {"Q8_0": 0.5}, "must be >= 1"),
        ("verify", "quality_ctx", 0, "must be > 0"),
    ],
)
def test_range_checks(section, key, value, msg):
    with pytest.raises(UserError, match=msg):
        from_dict({section: {key: value}})


def test_overrides_parse_yaml_values():
    cfg = from_dict({}, ["distill.steps=7", "export.gguf=[F16]", "teacher.model=/x", "distill.lr=3e-4"])
    assert cfg.distill.steps == 7 and cfg.export.gguf == ["F16"] and cfg.teacher.model == "/x"
    assert cfg.distill.lr == pytest.approx(3e-4)


def test_override_errors():
    with pytest.raises(UserError, match="key=value"):
        apply_override({}, "distill.steps")
    with pytest.raises(UserError, match="not a section"):
        apply_override({"name": "x"}, "name.sub=1")


def test_load_config_errors(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(lst)


def test_config_field_reads_type_and_default_from_the_dataclasses():
    from toolchain.config import config_field

    assert config_field("distill.steps") == (int, 40)
    assert config_field("bench.targets") == (list[str], ["cpu"])
    with pytest.raises(KeyError):
        config_field("distill.stpes")


def test_typed_fields_win_over_set_and_stay_as_typed():
    # a flag's value is assigned as parsed: a teacher named 2024 stays the string '2024'
    cfg = from_dict({"distill": {"steps": 3}}, ["distill.steps=5"], {"distill.steps": 7, "teacher.model": "2024"})
    assert cfg.distill.steps == 7 and cfg.teacher.model == "2024"
    with pytest.raises(UserError, match="distill.steps: expected int"):
        from_dict({}, [], {"distill.steps": "7"})
