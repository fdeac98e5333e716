"""The batched torch reference computes what one prompt at a time computes."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from toolchain.verify.reference import Reference


def _one_prompt(model, ids, greedy_tokens):
    """The plain per-prompt greedy decode the batched reference must reproduce."""
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        prompt = model(torch.tensor([ids]), past_key_values=cache, use_cache=True).logits[0].numpy()
        tokens, steps = [int(prompt[-1].argmax())], []
        while len(tokens) < greedy_tokens:
            step = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True).logits[0, -1].numpy()
            steps.append(step)
            tokens.append(int(step.argmax()))
    return prompt, tokens, np.stack(steps)


class _Tok:
    def __call__(self, text):
        return type("Encoding", (), {"input_ids": [3 + (ord(c) % 200) for c in text]})()


@pytest.mark.parametrize("fixture", ["tiny_dir", "tiny_gemma_dir"])
def test_batched_reference_equals_one_prompt_at_a_time(fixture, request):
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture), dtype=torch.float32).eval()
    # lengths 1..27 so rows are padded by different amounts, and past Gemma's sliding window of 8
    prompts = ["a", "hello there", "The quick brown fox jumps over", "x" * 27, "def f(x): return x"]
    ref = Reference(model, _Tok(), prompts, greedy_tokens=12)
    for p, got in zip(prompts, ref.get("fp32")):
        prompt, tokens, steps = _one_prompt(model, got.ids, 12)
        assert np.isfinite(got.prompt_logits).all() and np.isfinite(got.step_logits).all()
        np.testing.assert_allclose(got.prompt_logits, prompt, atol=2e-4, rtol=0)
        assert got.greedy == tokens, p
        np.testing.assert_allclose(got.step_logits, steps, atol=2e-4, rtol=0)


def test_verify_prompts_come_from_the_runs_own_heldout_text():
    """With data.seed != 0 other documents are held out; verify must follow the run's split, or
    its "held-out" prompts would partly be training text."""
    from toolchain.config import DataConfig
    from toolchain.data.corpus import load_documents, split_documents
    from toolchain.verify.gguf import verify_prompts

    def held_text(seed: int) -> str:
        _, held = split_documents(load_documents("pydoc"), DataConfig().heldout_fraction, seed)
        return " ".join(" ".join(doc.split()) for doc in held)

    prompts = {seed: verify_prompts([], 8, DataConfig(seed=seed)) for seed in (0, 1)}
    for seed in (0, 1):
        assert len(prompts[seed]) == 8 and all(p in held_text(seed) for p in prompts[seed]), seed
    assert not all(p in held_text(0) for p in prompts[1])  # what the seed-0 split would have given
