import pytest
import torch
from transformers import AutoModelForCausalLM

from toolchain.errors import UserError
from toolchain.models.load import load_model
from toolchain.student import build_student, choose_layers, make_student


@pytest.fixture(scope="module")
def teacher(tiny_dir_6):
    return load_model(str(tiny_dir_6))


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(0))


def test_angular_rule_keeps_first_and_last(teacher, calib):
    keep = choose_layers(teacher.model, calib, 3)
    assert len(keep) == 3 and keep[0] == 0 and keep[-1] == 5
    assert teacher.model.config.num_hidden_layers == 6  # measuring must not modify the teacher
    assert len(teacher.model.model.layers) == 6


def test_stride_rule(teacher, calib):
    # evenly spaced, first and last kept; 2.5 rounds to even (Python's round)
    assert choose_layers(teacher.model, calib, 3, "stride") == [0, 2, 5]
    assert choose_layers(teacher.model, calib, 4, "stride") == [0, 2, 3, 5]


def test_full_student_equals_teacher(teacher, calib):
    student, keep = make_student(teacher, 6, calib)
    assert keep == list(range(6))
    with torch.no_grad():
        torch.testing.assert_close(student(calib).logits, teacher.model(calib).logits)


def test_saved_student_loads_and_matches(teacher, calib, tmp_path):
    res = build_student(teacher, tmp_path / "s", [0, 2, 5], calib)
    assert res["kept_layers"] == [0, 2, 5]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert loaded.config.num_hidden_layers == 3
    student, _ = make_student(teacher, [0, 2, 5], calib)
    with torch.no_grad():
        torch.testing.assert_close(loaded(calib).logits, student(calib).logits)
        # and generation with a KV cache works (layer indices were renumbered)
        out = loaded.generate(calib[:1, :5], max_new_tokens=4, do_sample=False)
    assert out.shape[1] == 9


def test_bad_keep_layers(teacher, calib):
    with pytest.raises(UserError, match="only 6 layers"):
        make_student(teacher, 9, calib)
    with pytest.raises(UserError, match=r"layers \[7\]"):
        make_student(teacher, [0, 7], calib)
