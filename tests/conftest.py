"""Shared fixtures: tiny random models built from a config, with the embedded model's tokenizer.

The tokenizer is SmolLM2's (read once from the bundled GGUF and cached), so tiny models
exercise the real byte-level BPE, special tokens and chat template, while their weights are a
few MB and every stage runs in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: uses the real embedded model (tens of seconds)")


@pytest.fixture(scope="session")
def teacher_dir() -> Path:
    """HF directory of the real embedded teacher (converted from its GGUF once, then cached)."""
    from toolchain.models.load import resolve_model_dir

    return resolve_model_dir("smollm2-135m-instruct")


def make_tiny_llama(out: Path, tokenizer_src: Path, layers: int = 4, seed: int = 0, vocab_pad: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_src)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok) + vocab_pad,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    model = LlamaForCausalLM(config)
    # larger-than-default init so logits are far from uniform (ties would make greedy checks flaky)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "toolchain.json").write_text(
        json.dumps({"name": "tiny-llama", "license": "apache-2.0", "tokenizer_pre": "smollm"}) + "\n"
    )
    return out


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, teacher_dir) -> Path:
    """A 4-layer, 64-wide random llama with SmolLM2's tokenizer (~3.3M params)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", teacher_dir)


@pytest.fixture(scope="session")
def tiny_dir_6(tmp_path_factory, teacher_dir) -> Path:
    """A 6-layer variant, used as a tiny teacher for student/distill tests."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny6") / "model", teacher_dir, layers=6, seed=1)


@pytest.fixture(scope="session")
def tiny_onnx(tiny_dir, tmp_path_factory) -> tuple[dict, Path]:
    """(export record, folder) of `tiny_dir` exported to ONNX once per session in every precision:
    fp32 at <folder>, fp16/int8/int4 beside it (<folder>-int4, ...)."""
    from toolchain.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "onnx"
    return export_onnx(tiny_dir, out, ["int4", "fp32", "int8", "fp16"]), out
