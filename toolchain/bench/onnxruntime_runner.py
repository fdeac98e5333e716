"""onnxruntime runner: prefill and greedy decode of an exported ONNX decoder (OnnxDecoder).

Imports neither torch nor transformers, so it runs on a device with only onnxruntime.
CPU execution provider by default; the CUDA one for the cuda target where onnxruntime-gpu has it.
"""

from __future__ import annotations

import numpy as np

from toolchain.bench.stats import run_bench

CUDA_PROVIDERS = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def unavailable(device: str) -> str | None:
    """Why this runtime cannot run on `device` here, or None."""
    import onnxruntime as ort

    if device != "cuda":
        return None
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "no CUDA device / onnxruntime without CUDAExecutionProvider: pip install onnxruntime-gpu"
    return None


class OrtSession:
    def __init__(self, model_path: str, threads: int, n_ctx: int, device: str = "cpu"):
        import onnxruntime as ort

        from toolchain.runtime.onnx_decoder import OnnxDecoder

        kw = {"providers": CUDA_PROVIDERS} if device == "cuda" else {}
        self.dec = OnnxDecoder(model_path, threads=threads, **kw)
        providers = self.dec.session.get_providers()
        if device == "cuda" and providers[0] != "CUDAExecutionProvider":
            raise RuntimeError(f"onnxruntime fell back to {providers[0]}")  # no silent CPU run on a cuda target
        self._logits: np.ndarray | None = None
        self.info = {
            "backends": "CUDA" if device == "cuda" else "CPU",
            "n_batch": None,
            "n_gpu_layers": None,  # one call per prompt
            "runtime_version": f"onnxruntime {ort.__version__}",
            "providers": providers,
        }

    def reset(self) -> None:
        self.dec.reset()
        self._logits = None

    def feed(self, ids: list[int]) -> None:
        self._logits = self.dec.forward(ids)

    def argmax(self) -> int:
        assert self._logits is not None  # stats.measure feeds before every argmax
        return int(np.argmax(self._logits[-1]))

    def close(self) -> None:
        self.dec = None  # type: ignore[assignment]  # drops the onnxruntime session; unused after close


def bench(model_path: str, prompt_ids: list[int], gen_tokens: int, runs: int, threads: int, **kw) -> dict:
    """`model_path`: model.onnx or its folder (with model_info.json); options as stats.run_bench."""
    return run_bench("onnxruntime", OrtSession, model_path, prompt_ids, gen_tokens, runs, threads, **kw)
