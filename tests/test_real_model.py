"""End-to-end checks on the real embedded teacher (SmolLM2-135M-Instruct), not a toy."""

import pytest

from toolchain.config import VerifyConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher():
    from toolchain.models.load import load_model

    return load_model("smollm2-135m-instruct")


def test_teacher_f16_gguf_matches_torch_in_llama_cpp(teacher, tmp_path):
    """Our writer on the real 30-layer model: same tokens, same logits, same greedy text."""
    from toolchain.export.gguf import write_gguf
    from toolchain.verify.gguf import verify_gguf

    path = write_gguf(teacher.path, tmp_path / "teacher-F16.gguf", "F16")
    v = VerifyConfig()
    res = verify_gguf(
        teacher.path,
        path,
        "F16",
        v.prompts,
        32,
        v.max_nmse,
        v.min_greedy_agreement,
        model=teacher.model,
        tokenizer=teacher.tokenizer,
    )
    assert res["tokenizer_parity"] == 1.0 and res["tokenizer_texts"] >= 9
    assert res["nmse_max"] < 1e-4
    assert res["greedy_agreement"] == 1.0  # 32 greedy tokens on every prompt


def test_student_from_real_teacher_is_better_than_stride(teacher, tmp_path):
    """The measured layer rule beats a fixed stride on held-out text (no training)."""
    from toolchain.config import DataConfig
    from toolchain.data.corpus import train_and_heldout
    from toolchain.distill.evaluate import evaluate
    from toolchain.distill.run import calibration_blocks
    from toolchain.student import make_student

    data = DataConfig()
    calib = calibration_blocks(teacher.tokenizer, data, 4)
    _, held = train_and_heldout(teacher.tokenizer, "pydoc", 129, 0.1, 0, 4)
    angular, keep = make_student(teacher, 20, calib, "angular")
    stride, _ = make_student(teacher, 20, calib, "stride")
    a = evaluate(angular, teacher.model, held)
    s = evaluate(stride, teacher.model, held)
    assert keep[0] == 0 and keep[-1] == 29
    assert a["kl"] < s["kl"] and a["ce"] < s["ce"]
