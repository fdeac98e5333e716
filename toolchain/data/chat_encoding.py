"""A chat example as token ids, with how many of them are prompt: the one rendering training and eval share."""

from __future__ import annotations


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
