"""The quantize section: quantization-aware distillation after the distill stage."""

from __future__ import annotations

from dataclasses import dataclass

from toolchain.config.checks import choice, positive
from toolchain.formats import QAT_TYPES


@dataclass
class QuantizeConfig:
    # none, or a GGUF type (Q4_0, Q8_0): the distilled student distils again for `steps` steps
    # with every weight rounded exactly as that GGUF file stores it (export.gguf_overrides
    # included), so the file holds the weights it was trained with
    qat: str = "none"
    steps: int = 100
    lr: float = 1e-4  # measured on SmolLM2's Q4_0: benchmarks/quant_quality.py
    # GGUF types: also round each matmul's input to 8 bits as llama.cpp's CPU matmul does (off
    # for a backend that multiplies in float, e.g. GPU builds that dequantize the weights)
    round_activations: bool = True
    # Q4_0/Q8_0 tensors: each block's scale trains with the weights (LSQ) instead of following
    # its largest weight, starting from llama.cpp's importance-weighted scale search on the
    # student's calibration rows where the student measures closer to itself so rounded (else
    # from the largest weight); the file stores the trained scales (the student keeps them
    # beside its weights, in qat/scales.safetensors). Measured: benchmarks/quant_quality.py
    learn_scales: bool = True

    def validate(self, where: str) -> None:
        choice(f"{where}.qat", self.qat, ("none", *QAT_TYPES))
        positive(f"{where}.steps", self.steps)
        positive(f"{where}.lr", self.lr)
