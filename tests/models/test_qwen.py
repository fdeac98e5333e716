"""Qwen2 / Qwen3 export: tiny random models (no real Qwen weights here) checked in llama.cpp."""

import json

import gguf
import pytest
import torch

from toolchain.config import VerifyConfig
from toolchain.export.gguf import write_gguf
from toolchain.verify.gguf import verify_gguf


def _tiny(out, tokenizer_src, model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_src)
    extra = {"head_dim": 32} if model_type == "qwen3" else {}  # Qwen3's head_dim differs from hidden/heads
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=model_type == "qwen3",
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        **extra,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 or name.endswith("bias"):
                p.normal_(0, 0.08)
            elif name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    # no tokenizer_pre given: the exporter must recognise Qwen's pre-tokenizer regex, which
    # transformers' Qwen2Tokenizer puts in place of the donor tokenizer's
    (out / "toolchain.json").write_text(json.dumps({"name": f"tiny-{model_type}"}))
    return out


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_qwen_f16_matches_torch_in_llama_cpp(model_type, tiny_dir, tmp_path):
    model_dir = _tiny(tmp_path / model_type, tiny_dir, model_type)
    path = write_gguf(model_dir, tmp_path / "model-F16.gguf", "F16")
    r = gguf.GGUFReader(str(path))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    names = {t.name for t in r.tensors}
    assert f["general.architecture"] == model_type
    if model_type == "qwen2":
        assert "blk.0.attn_q.bias" in names and "output.weight" in names  # untied head is written
        assert f["tokenizer.ggml.pre"] == "qwen2"
    else:
        assert "blk.0.attn_q_norm.weight" in names and f["qwen3.attention.key_length"] == 32
    v = VerifyConfig()
    res = verify_gguf(model_dir, path, "F16", v.prompts, 8, v.max_nmse, v.min_greedy_agreement)
    assert res["nmse_max"] < 1e-4 and res["greedy_agreement"] == 1.0
