"""The torch side of every check, computed once per model and weight rounding.

For each prompt: its token ids, the logits at every prompt position, torch's greedy
continuation, and the logits of each decode step through the KV cache. An export is compared
with the reference that rounds the weights as the export stores them: an F16 GGUF or an fp16
ONNX holds fp16 weights, and fp16 rounding alone moves a real model's logits by ~5e-2, more
than a runtime difference, so against fp32 a correct F16 file looks wrong (a real 0.5B student
flipped 9% of its greedy tokens at near-ties). Quantized types are compared with fp32: their
grids are what verification measures.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

ROUNDINGS = ("fp32", "fp16", "bf16", "trained")
_ROUNDING = {("gguf", "F16"): "fp16", ("gguf", "BF16"): "bf16", ("onnx", "fp16"): "fp16"}
LABELS = {
    "fp32": "torch fp32",
    "fp16": "torch fp32, fp16-rounded weights",
    "bf16": "torch fp32, bf16-rounded weights",
    "trained": "torch fp32, weights rounded as trained (quantize.qat)",
}


def rounding_for(fmt: str, quant: str, trained: str | None = None) -> str:
    """The weight rounding of an export's reference: fp16 for F16/fp16 files, bf16 for BF16, and
    for the GGUF type `trained` (a student trained through it that kept its latent weights:
    Reference.trained_type) the rounding it was trained with: that file holds exactly those weights."""
    if fmt == "gguf" and quant == trained:
        return "trained"
    return _ROUNDING.get((fmt, quant), "fp32")


@dataclass
class PromptReference:
    ids: list[int]
    prompt_logits: np.ndarray  # [len(ids), vocab] float32
    greedy: list[int]  # torch's greedy continuation (greedy_tokens long)
    step_logits: np.ndarray  # [greedy_tokens - 1, vocab]: logits after feeding greedy[0..-2]

    @property
    def choice_logits(self) -> np.ndarray:
        """The logits that chose each greedy token: the last prompt position, then every step."""
        return np.concatenate([self.prompt_logits[-1:], self.step_logits])


def _rounded(model, rounding: str, qat: dict | None = None, scales: dict | None = None):
    if rounding == "fp32":
        return model
    import torch

    if rounding == "trained":
        from toolchain.quantize.qat import bake, trained_rounding

        out = copy.deepcopy(model)
        trained_rounding(qat or {}, scales).apply(out)
        bake(out)
        return out

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[rounding]
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.copy_(p.to(dtype).float())
    return out


def _run_batch(model, batch: list[list[int]], greedy_tokens: int) -> list[PromptReference]:
    """Greedy-decode several prompts at once, left-padded, through one KV cache.

    One batched step costs about what a single-prompt step costs on a CPU (the weights are read
    once either way), so 16 prompts take ~1/16 of the time. Padded positions are masked and
    every row gets its own position ids, so each row computes what it would alone (to float
    rounding, ~1e-6 of a logit)."""
    import torch
    from transformers import DynamicCache

    width = max(len(ids) for ids in batch)
    pad = [width - len(ids) for ids in batch]
    input_ids = torch.tensor([[0] * p + ids for p, ids in zip(pad, batch)])
    mask = torch.tensor([[0] * p + [1] * len(ids) for p, ids in zip(pad, batch)])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        logits = model(
            input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
        ).logits.float()
        prompts = [logits[i, p:].numpy() for i, p in enumerate(pad)]
        last = logits[:, -1]
        tokens, steps = [last.argmax(-1)], []
        for _ in range(greedy_tokens - 1):
            mask = torch.cat([mask, torch.ones(len(batch), 1, dtype=mask.dtype)], dim=-1)
            positions = positions[:, -1:] + 1
            step = (
                model(
                    tokens[-1][:, None],
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=cache,
                    use_cache=True,
                )
                .logits[:, -1]
                .float()
            )
            steps.append(step.numpy())
            tokens.append(step.argmax(-1))
    vocab = logits.shape[-1]
    out = []
    for i, ids in enumerate(batch):
        rows = np.stack([s[i] for s in steps]) if steps else np.zeros((0, vocab), np.float32)
        out.append(PromptReference(ids, prompts[i], [int(t[i]) for t in tokens], rows))
    return out


def _run_prompts(model, prompts: list[list[int]], greedy_tokens: int) -> list[PromptReference]:
    """Every prompt's reference, in batches sized so one batch's logits stay under ~1 GB."""
    vocab = model.config.get_text_config().vocab_size
    width = max(len(ids) for ids in prompts) + greedy_tokens
    size = max(1, min(16, (1 << 30) // (4 * vocab * width)))
    out: list[PromptReference] = []
    for start in range(0, len(prompts), size):
        out += _run_batch(model, prompts[start : start + size], greedy_tokens)
    return out


class Reference:
    """Torch's figures for `prompts`, per weight rounding, each computed on first use."""

    def __init__(
        self,
        model,
        tokenizer,
        prompts: list[str],
        greedy_tokens: int,
        qat: dict | None = None,
        scales: dict | None = None,
    ):
        """`qat`: the student's quantize.qat record (its toolchain.json), and `scales` its learned
        block scales (quantize.learn_scales), for the "trained" rounding."""
        from toolchain.errors import UserError

        self.model, self.prompts, self.greedy_tokens = model, list(prompts), greedy_tokens
        self.qat, self.scales = qat or {}, scales or {}
        # the model's own special tokens: Gemma needs its BOS (without it the reference itself is
        # off-distribution); SmolLM2's tokenizer adds none
        self.ids = [list(tokenizer(p).input_ids) for p in self.prompts]
        empty = [p for p, ids in zip(self.prompts, self.ids) if not ids]
        if empty:
            raise UserError(f"verify prompt {empty[0]!r} tokenizes to nothing")
        self._runs: dict[str, list[PromptReference]] = {}

    def get(self, rounding: str) -> list[PromptReference]:
        if rounding not in self._runs:
            model = _rounded(self.model, rounding, self.qat, self.scales)
            self._runs[rounding] = _run_prompts(model, self.ids, self.greedy_tokens)
        return self._runs[rounding]

    @property
    def trained_type(self) -> str | None:
        """The GGUF type the student trained through while keeping its latent weights (a
        K-quant mix, learned scales), if any: its file holds that rounding, not the weights
        (a student baked onto its type's grid is its own reference)."""
        from toolchain.formats import QAT_MIX_TYPES

        t = self.qat.get("type")
        return t if t in QAT_MIX_TYPES or self.qat.get("scales") else None

    def matches(self, prompts: list[str], greedy_tokens: int) -> bool:
        return self.prompts == list(prompts) and self.greedy_tokens == greedy_tokens
