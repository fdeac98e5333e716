"""The pack section: what the app bundle (toolchain/pack) holds."""

from __future__ import annotations

from dataclasses import dataclass

from toolchain.config.checks import choice
from toolchain.errors import UserError


@dataclass
class PackConfig:
    enabled: bool = True  # the run ends with run_dir/bundle
    gguf: list[str] | None = None  # GGUF types to ship; None: every one the run exported and verified
    onnx: list[str] | None = None  # ONNX precisions to ship; None: every one (fp32 included)
    zip: bool = False  # also bundle.zip
    temperature: float = 0.0  # the apps' default; 0 = greedy, as the task was evaluated
    # with a task: the fallback threshold of the smallest GGUF, measured on the calibration split,
    # keeping student + teacher within max_accuracy_drop of the teacher's accuracy
    calibrate: bool = True
    max_accuracy_drop: float = 0.01

    def validate(self, where: str) -> None:
        from toolchain.formats import ONNX_PRECISIONS, SUPPORTED_TYPES

        for t in self.gguf or ():
            choice(f"{where}.gguf", t, SUPPORTED_TYPES)
        for p in self.onnx or ():
            choice(f"{where}.onnx", p, ONNX_PRECISIONS)
        if not 0.0 <= self.max_accuracy_drop < 1.0:
            raise UserError(f"{where}.max_accuracy_drop must be between 0 and 1, got {self.max_accuracy_drop}")
        if self.temperature < 0:
            raise UserError(f"{where}.temperature must be >= 0, got {self.temperature}")
