"""Provenance names the teacher by name and hash, never by this machine's paths."""

import gguf
import torch

from toolchain.export.gguf import write_gguf
from toolchain.models.load import load_model
from toolchain.models.provenance import public_meta, public_name
from toolchain.student import build_student


def test_public_names():
    assert public_name("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert public_name("/home/me/models/qwen2.5-0.5b-instruct-q8_0.gguf") == "qwen2.5-0.5b-instruct-q8_0.gguf"
    assert public_name("./runs/x/student/") == "student"
    assert public_name("smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert public_meta({"source": "/a/b/c.gguf", "license": "mit"}) == {"source": "c.gguf", "license": "mit"}


def test_student_gguf_names_its_teacher_without_a_path(tiny_dir, tmp_path):
    teacher = load_model(str(tiny_dir))
    assert "/" not in teacher.meta["source"] and len(teacher.meta["sha256"]) == 64
    calib = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    build_student(teacher, tmp_path / "student", 2, calib)
    path = write_gguf(tmp_path / "student", tmp_path / "s-F16.gguf", "F16")
    fields = {k: v.contents() for k, v in gguf.GGUFReader(str(path)).fields.items() if not k.startswith("GGUF.")}
    text_values = [v for v in fields.values() if isinstance(v, str)]
    assert not any(str(tmp_path) in v or str(tiny_dir) in v for v in text_values)
    assert fields["general.base_model.0.name"] == fields["toolchain.teacher.name"] == teacher.meta["source"]
    assert fields["toolchain.teacher.sha256"] == teacher.meta["sha256"]
