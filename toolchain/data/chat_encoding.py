"""A chat example as token ids, with how many of them are prompt: the one rendering training and eval share."""

from __future__ import annotations

import json
import os
from pathlib import Path


def prompt_token_ids(tokenizer, chat: list[dict]) -> list[int]:
    """The chat rendered with the model's template, ready for its answer (generation prompt added)."""
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def encode_example(tokenizer, messages: list[dict]) -> tuple[list[int], int]:
    """Token ids of a rendered chat and how many of them are prompt (everything before the answer)."""
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        # templates that rewrite earlier turns when an answer follows: fall back to appending
        full = prompt + messages[-1]["content"] + (tokenizer.eos_token or "")
    p_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    ids = tokenizer(full, add_special_tokens=False).input_ids
    # BPE can merge across the prompt/answer boundary; count the prompt as the common prefix
    n_prompt = 0
    for a, b in zip(p_ids, ids):
        if a != b:
            break
        n_prompt += 1
    # the template's trailing newline after <|im_end|> is not something to learn to emit
    while len(ids) > n_prompt + 1 and tokenizer.decode(ids[-1:]).strip() == "":
        ids = ids[:-1]
    return ids, n_prompt


# end-of-turn markers of the chat templates we know, used as stop tokens where the vocabulary has them
_END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>", "</s>")


def stop_token_ids(tokenizer, model_dir: str | os.PathLike | None = None) -> list[int]:
    """The model's stop tokens: generation_config's EOS ids, the tokenizer's EOS, end-of-turn markers."""
    ids: set[int] = set()
    gen = Path(model_dir) / "generation_config.json" if model_dir else None
    if gen is not None and gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in _END_OF_TURN if t in vocab)
    return sorted(ids)
