"""Tokenizer -> GGUF vocabulary (byte-level BPE, the "gpt2" tokenizer model of llama.cpp)."""

from __future__ import annotations

import json
from pathlib import Path

from toolchain.errors import UserError

# llama.cpp picks its pre-tokenizer regexes by name. We recognise the HF pre-tokenizer
# structure of the families we support; a GGUF teacher carries its own name in toolchain.json.
_PRE_BY_STRUCTURE = {
    ("ByteLevel",): "gpt2",
    ("Digits", "ByteLevel"): "smollm",
}


def tokenizer_pre(model_dir: Path, meta: dict) -> str:
    if meta.get("tokenizer_pre"):
        return meta["tokenizer_pre"]
    tok_json = model_dir / "tokenizer.json"
    if not tok_json.is_file():
        raise UserError(f"{model_dir} has no tokenizer.json; the GGUF exporter needs a fast (tokenizers) tokenizer")
    pre = json.loads(tok_json.read_text()).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    key = tuple(p.get("type") for p in parts)
    if key not in _PRE_BY_STRUCTURE:
        raise UserError(
            f"cannot tell which llama.cpp pre-tokenizer matches {model_dir}'s tokenizer ({'+'.join(map(str, key))}); "
            f"set \"tokenizer_pre\" in {model_dir}/toolchain.json"
        )
    return _PRE_BY_STRUCTURE[key]


def bpe_vocab(tokenizer, vocab_size: int):
    """(tokens, token types) for ids 0..vocab_size-1; ids the tokenizer lacks become padding."""
    import gguf

    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise UserError("the GGUF exporter needs a fast (tokenizers) tokenizer with a tokenizer.json")
    model_type = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["type"]
    if model_type != "BPE":
        raise UserError(f"tokenizer model '{model_type}' is not supported by the GGUF exporter yet (only byte-level BPE)")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size:
        raise UserError(f"tokenizer has {len(by_id)} tokens but the model's vocab_size is {vocab_size}")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types
