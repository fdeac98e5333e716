"""A correct F16 export of a real student passes verify; its near-ties are reported, not failed.

Pruned students of the two bundled real models (no training: their logits are flat, so near-ties
are common, which is where a check against unrounded fp32 weights used to fail correct files):
SmolLM2 depth-pruned, Gemma-3-270M depth- and then width-pruned (hidden channels and MLP neurons
by activation importance, its norm offsets and 262k tied embedding sliced with them)."""

import pytest

from toolchain.config import DataConfig, VerifyConfig

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "teacher_name,keep,width",
    [("smollm2-135m-instruct", 10, None), ("gemma3-270m", 6, {"hidden_size": 512, "intermediate_size": 1536})],
)
def test_f16_of_a_real_student_passes(teacher_name, keep, width, tmp_path):
    from toolchain.distill.run import calibration_blocks
    from toolchain.export.gguf import export_gguf
    from toolchain.models.load import load_model
    from toolchain.student import build_student
    from toolchain.verify.exports import verify_exports

    teacher = load_model(teacher_name)
    student = tmp_path / "student"
    calib = calibration_blocks(teacher.tokenizer, DataConfig(), 4)
    build_student(teacher, student, keep, calib)
    del teacher
    if width:
        from toolchain.config import PruneConfig
        from toolchain.prune import prune_student

        rec = prune_student(student, tmp_path / "pruned", PruneConfig(enabled=True, **width), calib, tmp_path / "w")
        assert rec["shape"]["hidden_size"] == width["hidden_size"] and rec["params"] < rec["params_before"]
        student = tmp_path / "pruned"
    recs = [{**r, "format": "gguf"} for r in export_gguf(student, tmp_path / "export", ["F16"])]
    cfg = VerifyConfig(greedy_tokens=24, quality_tokens=0)
    (res,) = verify_exports(student, recs, cfg)
    assert res["passed"] and res["tokenizer_parity"] == 1.0 and res["prompts"] >= 16
    assert res["reference"] == "torch fp32, fp16-rounded weights"
    assert res["nmse_max"] < 1e-4 and res["greedy_agreement"] == 1.0
    assert res["greedy_decisive"] + res["near_ties"] == res["greedy_positions"] == 16 * 24
