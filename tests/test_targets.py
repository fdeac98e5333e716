import pytest

from toolchain.errors import UserError
from toolchain.targets import KINDS, known_targets, load_target

GOOD = {"name": "x", "kind": "cpu", "threads": 1, "memory_budget_mb": 1, "memory_bandwidth_gbps": 1}


def _write(tmp_path, fields: dict, extra: str = ""):
    p = tmp_path / "t.yaml"
    p.write_text("".join(f"{k}: {v}\n" for k, v in fields.items()) + extra)
    return str(p)


def test_repo_targets_load_and_cover_the_device_classes():
    targets = [load_target(n) for n in known_targets()]
    assert {t.kind for t in targets} == set(KINDS)
    mobile = {t.name for t in targets if t.kind == "mobile-class"}
    assert {"phone-mid", "phone-low", "rpi5"} <= mobile
    for t in targets:
        assert t.threads >= 1 and t.memory_budget_mb > 0 and t.memory_bandwidth_gbps > 0 and t.context > 0
        assert t.runtimes
    assert load_target("rpi5").memory_bandwidth_gbps == pytest.approx(4267e6 * 4 / 1e9, rel=0.01)  # 32-bit LPDDR4X-4267


def test_unknown_target_and_kind_and_key(tmp_path):
    with pytest.raises(UserError, match="unknown target 'tpu9'"):
        load_target("tpu9")
    with pytest.raises(UserError, match="kind 'quantum'"):
        load_target(_write(tmp_path, {**GOOD, "kind": "quantum"}))
    with pytest.raises(UserError, match="unknown key 'colour'"):
        load_target(_write(tmp_path, GOOD, "colour: red\n"))


@pytest.mark.parametrize("field", ["name", "kind", "threads", "memory_budget_mb", "memory_bandwidth_gbps"])
def test_missing_field_is_named(tmp_path, field):
    with pytest.raises(UserError, match=f"missing key '{field}'"):
        load_target(_write(tmp_path, {k: v for k, v in GOOD.items() if k != field}))


@pytest.mark.parametrize(
    "field,value",
    [
        ("threads", 0),
        ("threads", "two"),
        ("threads", "yes"),
        ("memory_budget_mb", -5),
        ("memory_bandwidth_gbps", "fast"),
        ("context", 1.5),
        ("runtimes", "llama_cpp"),
        ("quant_types", "[1, 2]"),
    ],
)
def test_wrong_field_is_named(tmp_path, field, value):
    with pytest.raises(UserError, match=f"{field} must be"):
        load_target(_write(tmp_path, {**GOOD, field: value}))


def test_unknown_runtime_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="runtimes: 'tflite'"):
        load_target(_write(tmp_path, {**GOOD, "runtimes": "[llama_cpp, tflite]"}))
    with pytest.raises(UserError, match="not valid YAML"):
        load_target(_write(tmp_path, GOOD, "threads: [\n"))
