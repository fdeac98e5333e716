"""Gemma 3: export through its arch module and prove llama.cpp computes what torch computes."""

import dataclasses

import gguf
import numpy as np
import pytest
import torch

from toolchain.config import VerifyConfig
from toolchain.errors import UserError, VerificationError
from toolchain.export import gguf as gguf_export
from toolchain.export.gguf import write_gguf
from toolchain.models import gemma3
from toolchain.models.load import load_model
from toolchain.models.registry import get_arch
from toolchain.student import make_student
from toolchain.verify.gguf import verify_gguf


def _fields(path):
    r = gguf.GGUFReader(str(path))
    return r, {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}


def _verify(model_dir, path, greedy=16):
    v = VerifyConfig()
    return verify_gguf(model_dir, path, "F16", v.prompts, greedy, v.max_nmse, v.min_greedy_agreement)


@pytest.fixture(scope="module")
def gemma_f16(tiny_gemma_dir, tmp_path_factory):
    return write_gguf(tiny_gemma_dir, tmp_path_factory.mktemp("g") / "model-F16.gguf", "F16")


def test_metadata_follows_llama_cpp_conventions(tiny_gemma_dir, gemma_f16):
    r, f = _fields(gemma_f16)
    assert f["general.architecture"] == "gemma3"
    assert f["gemma3.attention.sliding_window"] == 8
    assert f["gemma3.attention.sliding_window_pattern"] == [True, True, False, True, True, False]
    assert f["gemma3.rope.freq_base"] == 1_000_000.0 and f["gemma3.rope.freq_base_swa"] == 10_000.0
    assert f["gemma3.attention.key_length"] == 16
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.add_bos_token"] is True
    assert f["tokenizer.ggml.add_space_prefix"] is False
    types = f["tokenizer.ggml.token_type"]
    tokens = f["tokenizer.ggml.tokens"]
    assert types[tokens.index("<0x41>")] == gguf.TokenType.BYTE
    assert types[tokens.index("<start_of_turn>")] == gguf.TokenType.CONTROL
    names = {t.name for t in r.tensors}
    assert "output.weight" not in names and "blk.0.attn_q_norm.weight" in names
    # HF stores norm weights as offsets from 1; llama.cpp multiplies by the stored value
    from safetensors.torch import load_file

    hf = load_file(tiny_gemma_dir / "model.safetensors")["model.layers.0.input_layernorm.weight"].numpy()
    written = next(t for t in r.tensors if t.name == "blk.0.attn_norm.weight").data
    np.testing.assert_allclose(written, hf + 1.0, rtol=0, atol=1e-6)


def test_f16_matches_torch_in_llama_cpp(tiny_gemma_dir, gemma_f16):
    res = _verify(tiny_gemma_dir, gemma_f16)
    assert res["tokenizer_parity"] == 1.0
    assert res["nmse_max"] < 1e-4 and res["greedy_agreement"] == 1.0


def test_without_norm_offset_verify_fails(tiny_gemma_dir, tmp_path, monkeypatch):
    spec = dataclasses.replace(gemma3.ARCH, transform=lambda name, data, config: data)
    monkeypatch.setattr(gguf_export, "get_arch", lambda mt: spec)
    path = write_gguf(tiny_gemma_dir, tmp_path / "bad-F16.gguf", "F16")
    with pytest.raises(VerificationError, match="NMSE"):
        _verify(tiny_gemma_dir, path, greedy=4)


def test_pruned_student_exports_with_its_own_layer_pattern(tiny_gemma_dir, tmp_path):
    teacher = load_model(str(tiny_gemma_dir))
    calib = torch.randint(10, 1000, (2, 32))
    student, _keep = make_student(teacher, [0, 2, 3, 5], calib)
    assert student.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    student.save_pretrained(tmp_path / "s")
    teacher.tokenizer.save_pretrained(tmp_path / "s")
    path = write_gguf(tmp_path / "s", tmp_path / "s-F16.gguf", "F16")
    _, f = _fields(path)
    assert f["gemma3.block_count"] == 4
    assert f["gemma3.attention.sliding_window_pattern"] == [True, False, True, False]
    res = _verify(tmp_path / "s", path, greedy=8)
    assert res["nmse_max"] < 1e-4


def test_refuses_attention_scale_llama_cpp_cannot_express(tiny_gemma_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_gemma_dir)
    config.query_pre_attn_scalar = 99
    w = gguf.GGUFWriter(None, "gemma3")
    with pytest.raises(UserError, match="query_pre_attn_scalar=99"):
        get_arch("gemma3_text").write_hparams(w, config)
