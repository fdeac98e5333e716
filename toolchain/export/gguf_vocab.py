"""Tokenizer -> GGUF vocabulary, in the two forms llama.cpp knows for our families.

- byte-level BPE ("gpt2" tokenizer model: tokens + merges + a named pre-tokenizer), used by
  SmolLM2, Llama 3, Qwen;
- SentencePiece-style BPE ("llama" tokenizer model: tokens + scores + types, merged by score,
  unknown characters as <0xNN> byte tokens), used by Gemma and Llama 2/Mistral. An HF
  tokenizer.json keeps such a vocabulary as BPE with byte_fallback and a merge list but no
  scores, so we derive each token's score from the rank of the first merge that makes it:
  llama.cpp then merges in the same order as the HF tokenizer (checked by verify's
  tokenizer-parity corpus).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from toolchain.errors import UserError

# llama.cpp picks its pre-tokenizer regexes by name. We recognise the HF pre-tokenizer
# structure of the families we support; a GGUF teacher carries its own name in toolchain.json.
_PRE_BY_STRUCTURE = {
    ("ByteLevel",): "gpt-2",  # llama.cpp spells this pre-tokenizer "gpt-2" ("gpt2" is the model)
    ("Digits", "ByteLevel"): "smollm",
}

# Split regexes of tokenizer.json -> llama.cpp pre-tokenizer name (llama-vocab.cpp holds the
# same expressions, as comments next to its adapted ones)
_LETTERS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
_REST = " ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
_PRE_BY_REGEX = {
    _LETTERS + "\\p{N}|" + _REST: "qwen2",
    _LETTERS + "\\p{N}{1,3}|" + _REST: "llama-bpe",
}


def tokenizer_pre(model_dir: Path, meta: dict, tokenizer=None) -> str:
    if meta.get("tokenizer_pre"):
        return meta["tokenizer_pre"]
    if tokenizer is not None and getattr(tokenizer, "backend_tokenizer", None) is not None:
        # what the loaded tokenizer really runs (a model-specific class may replace the file's)
        pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    else:
        tok_json = model_dir / "tokenizer.json"
        if not tok_json.is_file():
            raise UserError(f"{model_dir} has no tokenizer.json; the GGUF exporter needs a fast (tokenizers) tokenizer")
        pre = json.loads(tok_json.read_text()).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    key = tuple(p.get("type") for p in parts)
    regex = (parts[0].get("pattern") or {}).get("Regex") if parts and parts[0].get("type") == "Split" else None
    if key == ("Split", "ByteLevel") and regex in _PRE_BY_REGEX:
        return _PRE_BY_REGEX[regex]
    if key not in _PRE_BY_STRUCTURE:
        raise UserError(
            f"cannot tell which llama.cpp pre-tokenizer matches {model_dir}'s tokenizer ({'+'.join(map(str, key))}); "
            f'set "tokenizer_pre" in {model_dir}/toolchain.json'
        )
    return _PRE_BY_STRUCTURE[key]


def bpe_vocab(tokenizer, vocab_size: int):
    """(tokens, token types) for ids 0..vocab_size-1; ids the tokenizer lacks become padding."""
    import gguf

    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise UserError("the GGUF exporter needs a fast (tokenizers) tokenizer with a tokenizer.json")
    model_type = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["type"]
    if model_type != "BPE":
        raise UserError(
            f"tokenizer model '{model_type}' is not supported by the GGUF exporter yet (only byte-level BPE)"
        )
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


def tokenizer_kind(tokenizer) -> str:
    """Which llama.cpp tokenizer model fits: "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)."""
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise UserError("the GGUF exporter needs a fast (tokenizers) tokenizer with a tokenizer.json")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model["type"] != "BPE":
        raise UserError(f"tokenizer model '{model['type']}' is not supported by the GGUF exporter yet (only BPE)")
    if model.get("byte_fallback"):
        return "llama"
    return "gpt2"


_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def spm_vocab(tokenizer, vocab_size: int):
    """(tokens, scores, types) for a SentencePiece-style BPE tokenizer (see module docstring)."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    merges = spec["model"].get("merges") or []
    rank: dict[str, int] = {}
    for k, m in enumerate(merges):
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        rank.setdefault(a + b, k)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size:
        raise UserError(f"tokenizer has {len(by_id)} tokens but the model's vocab_size is {vocab_size}")
    added = tokenizer.added_tokens_decoder
    unk = tokenizer.unk_token_id
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(tok)
            scores.append(-1000.0)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif i == unk:
            tokens.append(tok)
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNKNOWN)
        elif _BYTE_TOKEN.match(tok):
            tokens.append(tok)
            scores.append(0.0)
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(tok)
            # merged pieces rank by their merge; single characters are never a merge result,
            # so their score is never compared (they sort after every merge)
            scores.append(-float(rank.get(tok, len(merges) + i)))
            types.append(gguf.TokenType.NORMAL)
    return tokens, scores, types


def write_vocab(writer, tokenizer, model_dir: Path, meta: dict, vocab_size: int) -> None:
    """Tokenizer metadata: model, pre-tokenizer, tokens (+scores), types, merges, special ids."""
    import gguf

    kind = tokenizer_kind(tokenizer)
    if kind == "gpt2":
        tokens, types = bpe_vocab(tokenizer, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(tokenizer_pre(model_dir, meta, tokenizer))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
    else:
        tokens, scores, types = spm_vocab(tokenizer, vocab_size)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        # the HF normalizer only replaces spaces (no "▁" prepended), as Gemma's tokenizer.model says
        writer.add_add_space_prefix(_prepends_space(tokenizer))
    special = gguf.SpecialVocab(model_dir, load_merges=kind == "gpt2", n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)
    if "bos" not in special.add_special_token:
        # say it either way: llama.cpp's default depends on the tokenizer model, not on the HF tokenizer
        plain, with_special = tokenizer("a", add_special_tokens=False).input_ids, tokenizer("a").input_ids
        writer.add_add_bos_token(len(with_special) > len(plain) and with_special[0] == tokenizer.bos_token_id)


def _prepends_space(tokenizer) -> bool:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    parts = [spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}]
    flat: list[dict] = []
    for p in parts:
        flat.extend(p.get("normalizers") or p.get("pretokenizers") or [p])
    return any(p.get("type") == "Prepend" or p.get("prepend_scheme") in ("always", "first") for p in flat)
