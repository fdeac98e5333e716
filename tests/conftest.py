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


def pytest_collection_modifyitems(config, items):
    """Files with real-model tests first: the test processes take files in this order, so the
    longest ones start early instead of leaving one process working alone at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: the order within stays


@pytest.fixture(scope="session")
def teacher_dir() -> Path:
    """HF directory of the real embedded teacher (converted from its GGUF once, then cached)."""
    from toolchain.models.load import resolve_model_dir

    return resolve_model_dir("smollm2-135m-instruct")


def make_tiny_llama(
    out: Path, tokenizer_src: Path, layers: int = 4, seed: int = 0, vocab_pad: int = 0, hidden: int = 64
) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_src)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok) + vocab_pad,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
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


# Gemma 3's chat template (as shipped with google/gemma-3-*-it), used by the tiny Gemma below.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    '{%- else -%}{%- set first_user_prefix = "" -%}{%- set loop_messages = messages -%}{%- endif -%}'
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    '{{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}{%- endif -%}'
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
)


def make_spm_tokenizer(out: Path) -> Path:
    """A small SentencePiece-style tokenizer (BPE with byte fallback, spaces as '▁', no prefix
    space, BOS added), shaped like Gemma's tokenizer.json; trained on pydoc text in ~1 s."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Replace(" ", "▁")
    tk.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")  # only to keep training fast
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=special, show_progress=False, limit_alphabet=200)
    tk.train_from_iterator([topics[k] for k in sorted(topics)[:60]], trainer)
    # byte-fallback pieces are ordinary vocabulary entries (not added tokens), right after the specials
    spec = json.loads(tk.to_str())["model"]
    learned = sorted((i, t) for t, i in spec["vocab"].items() if i >= len(special))
    vocab = {t: i for i, t in enumerate(special + [f"<0x{b:02X}>" for b in range(256)] + [t for _, t in learned])}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in spec["merges"]]
    tk.model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    tk.add_special_tokens(special)
    tk.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")  # Gemma's (a no-op after the normalizer)
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    tok.chat_template = GEMMA_CHAT_TEMPLATE
    tok.save_pretrained(out)
    return out


def make_tiny_gemma3(out: Path, tokenizer_src: Path, layers: int = 6, seed: int = 0) -> Path:
    """A tiny random Gemma 3 text model: sliding window 8 so short prompts already cross it."""
    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_src)
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        max_position_embeddings=512,
        sliding_window=8,
        rms_norm_eps=1e-6,
        layer_types=["full_attention" if (i + 1) % 3 == 0 else "sliding_attention" for i in range(layers)],
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif name.endswith("norm.weight"):  # HF Gemma norms are offsets from 1: make them matter
                p.normal_(0, 0.2)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "toolchain.json").write_text(json.dumps({"name": "tiny-gemma3", "license": "gemma"}) + "\n")
    return out


@pytest.fixture(scope="session")
def spm_tokenizer_dir(tmp_path_factory) -> Path:
    return make_spm_tokenizer(tmp_path_factory.mktemp("spm-tok") / "tok")


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory, spm_tokenizer_dir) -> Path:
    """A 6-layer, 64-wide random Gemma 3 (sliding + full attention) with a Gemma-style tokenizer."""
    return make_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma") / "model", spm_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_onnx(tiny_dir, tmp_path_factory) -> tuple[dict, Path]:
    """(export record, folder) of `tiny_dir` exported to ONNX once per session in every precision:
    fp32 at <folder>, fp16/int8/int4 beside it (<folder>-int4, ...)."""
    from toolchain.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "onnx"
    return export_onnx(tiny_dir, out, ["int4", "fp32", "int8", "fp16"]), out


def make_tiny_causal_lm(out: Path, tokenizer_src: Path, model_type: str, layers: int = 3, seed: int = 0) -> Path:
    """A tiny random decoder of any architecture AutoConfig knows (llama, qwen2, qwen3, gemma3_text),
    64 wide, with the tokenizer in tokenizer_src. Weights are drawn wider than the default init
    so logits are far from uniform (ties would make greedy checks flaky)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_src)
    extra = {
        "qwen3": {"head_dim": 32},
        "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8},
    }
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=model_type != "qwen2",
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **extra.get(model_type, {}),
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 or name.endswith("bias"):
                p.normal_(0, 0.08)
            elif name.endswith("norm.weight"):
                # Gemma's norms are offsets from 1, the others are scales around 1
                p.normal_(0.0 if model_type.startswith("gemma") else 1.0, 0.2)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "toolchain.json").write_text(json.dumps({"name": f"tiny-{model_type}", "license": "apache-2.0"}) + "\n")
    return out
