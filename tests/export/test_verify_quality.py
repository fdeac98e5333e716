"""verify: decode-step logits through the KV cache, >= 16 prompts, and the quality table."""

import dataclasses

import pytest

from toolchain.config import VerifyConfig
from toolchain.errors import VerificationError
from toolchain.export.gguf import export_gguf
from toolchain.verify.exports import verify_exports
from toolchain.verify.quality import format_table


@pytest.fixture(scope="module")
def exports(tiny_dir, tmp_path_factory):
    recs = export_gguf(tiny_dir, tmp_path_factory.mktemp("vq"), ["F16", "Q8_0", "Q4_0"])
    return [{**r, "format": "gguf"} for r in recs]


def test_quality_table_and_decode_steps(tiny_dir, exports):
    # a random tiny model at 4 bits is far from its F16 (NMSE ~0.2): only the exact types are held tight here
    cfg = VerifyConfig(
        greedy_tokens=8, quality_tokens=768, quality_ctx=256, max_nmse={"F16": 1e-4, "Q8_0": 2e-3, "default": 1.0}
    )
    res = {r["quant"]: r for r in verify_exports(tiny_dir, exports, cfg, threads=1)}
    f16, q8, q4 = res["F16"], res["Q8_0"], res["Q4_0"]
    assert f16["prompts"] >= 16 and f16["tokenizer_parity"] == 1.0
    assert f16["decode_nmse_max"] < 1e-4 and f16["top1_agreement_all"] == 1.0 and f16["greedy_agreement"] == 1.0
    assert f16["reference"] == "torch fp32, fp16-rounded weights" and q8["reference"] == "torch fp32"
    assert f16["greedy_positions"] == f16["prompts"] * 8 == f16["greedy_decisive"] + f16["near_ties"]
    assert f16["quality"]["ppl_ratio"] == pytest.approx(1.0) and f16["quality"]["mean_kld"] < 1e-9
    assert f16["quality"]["reference"] == "F16 GGUF" and f16["quality"]["tokens_scored"] >= 300
    assert 0 < q8["quality"]["mean_kld"] < q4["quality"]["mean_kld"]
    assert q4["quality"]["top1_agreement"] <= q8["quality"]["top1_agreement"] <= 1.0
    table = format_table(list(res.values()))
    assert "| Q4_0" in table and "mean KLD" in table


def test_failing_quality_threshold_fails_with_figures(tiny_dir, exports):
    cfg = dataclasses.replace(
        VerifyConfig(greedy_tokens=4, quality_tokens=256, quality_ctx=256),
        max_nmse={"default": 1.0},
        max_mean_kld={"Q4_0": 1e-9, "default": None},
    )
    with pytest.raises(
        VerificationError,
        match=r"model-Q4_0.gguf FAILED: mean kld [0-9.e-]+ > 1e-09\. "
        r"Figures: tokenizer parity .*prompt NMSE .*limit 1e-09",
    ) as err:
        verify_exports(tiny_dir, exports, cfg, threads=1)
    failed = [r for r in err.value.figures["results"] if not r["passed"]]
    assert [r["quant"] for r in failed] == ["Q4_0"] and failed[0]["quality"]["mean_kld"] > 1e-9
