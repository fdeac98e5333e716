import dataclasses

import gguf
import numpy as np
import pytest

from toolchain.config import VerifyConfig
from toolchain.errors import UserError, VerificationError
from toolchain.export import gguf as gguf_export
from toolchain.export.gguf import export_gguf, write_gguf
from toolchain.models import llama
from toolchain.verify.gguf import verify_gguf


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return tiny_dir, export_gguf(tiny_dir, out, ["F16", "Q8_0", "Q4_K_M"])


def test_files_metadata_and_tensor_types(exported):
    _, recs = exported
    assert [r["quant"] for r in recs] == ["F16", "Q8_0", "Q4_K_M"]
    f16 = gguf.GGUFReader(recs[0]["path"])
    f = {k: v.contents() for k, v in f16.fields.items() if not k.startswith("GGUF.")}
    assert f["general.architecture"] == "llama"
    assert f["llama.block_count"] == 4 and f["llama.attention.head_count_kv"] == 2
    assert f["tokenizer.ggml.pre"] == "smollm" and f["tokenizer.ggml.model"] == "gpt2"
    assert "<|im_start|>" in f["tokenizer.chat_template"]
    assert f["tokenizer.ggml.eos_token_id"] == 2
    assert f["general.license"] == "apache-2.0"
    names = {t.name for t in f16.tensors}
    assert "token_embd.weight" in names and "output.weight" not in names  # tied head
    types = {t.name: t.tensor_type for t in f16.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    q8 = {t.name: t.tensor_type for t in gguf.GGUFReader(recs[1]["path"]).tensors}
    assert q8["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert recs[1]["bytes"] < recs[0]["bytes"]
    assert all(len(r["sha256"]) == 64 for r in recs)


@pytest.mark.parametrize("i", [0, 1, 2])
def test_each_type_verifies_in_llama_cpp(exported, i):
    model_dir, recs = exported
    v = VerifyConfig()
    res = verify_gguf(model_dir, recs[i]["path"], recs[i]["quant"], v.prompts, 16, v.max_nmse, v.min_greedy_agreement)
    assert res["passed"] and res["tokenizer_parity"] == 1.0
    if recs[i]["quant"] == "F16":
        assert res["nmse_max"] < 1e-4 and res["greedy_agreement"] == 1.0


def test_wrong_rotary_layout_is_caught(tiny_dir, tmp_path, monkeypatch):
    """Without the Q/K row permutation llama.cpp computes something else: verify must fail."""
    spec = dataclasses.replace(llama.ARCH, transform=lambda name, data, config: data)
    monkeypatch.setattr(gguf_export, "get_arch", lambda mt: spec)
    path = write_gguf(tiny_dir, tmp_path / "bad-F16.gguf", "F16")
    v = VerifyConfig()
    with pytest.raises(VerificationError, match="NMSE") as err:
        verify_gguf(tiny_dir, path, "F16", v.prompts, 8, v.max_nmse, v.min_greedy_agreement)
    assert err.value.figures["nmse_max"] > 1e-3
    # the message carries every figure and its threshold, not only the first failure
    for part in ("prompt NMSE max", "(limit 0.0001)", "greedy agreement", "near-ties", "tokenizer parity 100%"):
        assert part in str(err.value)


def test_wrong_rope_base_is_caught(tiny_dir, tmp_path):
    """A GGUF whose rotary base differs from the model's must fail, with the figures."""
    import json
    import shutil

    wrong = tmp_path / "wrong-rope"
    shutil.copytree(tiny_dir, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["rope_parameters"]["rope_theta"] = 500.0
    (wrong / "config.json").write_text(json.dumps(cfg))
    path = write_gguf(wrong, tmp_path / "bad-F16.gguf", "F16")
    v = VerifyConfig()
    with pytest.raises(VerificationError, match=r"bad-F16.gguf FAILED: .*NMSE .*Figures: .*decode NMSE max") as err:
        verify_gguf(tiny_dir, path, "F16", v.prompts, 8, v.max_nmse, v.min_greedy_agreement)
    assert err.value.figures["nmse_max"] > 1e-3 and not err.value.figures["passed"]


def test_interrupted_write_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    def boom(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(KeyboardInterrupt):
        write_gguf(tiny_dir, tmp_path / "model-F16.gguf", "F16")
    assert list(tmp_path.iterdir()) == []


def test_k_quant_without_f16_request_cleans_its_temp_file(tiny_dir, tmp_path):
    recs = export_gguf(tiny_dir, tmp_path, ["Q4_K_M"])
    assert [p.name for p in tmp_path.iterdir()] == ["model-Q4_K_M.gguf"]
    assert recs[0]["bytes"] > 0


def test_unknown_type_refused(tiny_dir, tmp_path):
    with pytest.raises(UserError, match="unknown GGUF type 'Q7_X'"):
        export_gguf(tiny_dir, tmp_path, ["Q7_X"])


def test_rotary_permutation_pairs_rows():
    w = np.arange(8, dtype=np.float32).reshape(8, 1)  # one head of 8 rows: halves [0..3] [4..7]
    out = llama._permute_rotary(w, 1).ravel().tolist()
    assert out == [0, 4, 1, 5, 2, 6, 3, 7]
