"""llama.cpp runner: prefill and greedy decode through llama-cpp-python's Llama.eval.

Imports neither torch nor transformers, so it runs on a device with only llama-cpp-python.
"""

from __future__ import annotations

import numpy as np

from toolchain.bench.stats import run_bench

CUDA_MISSING = (
    "no CUDA device / llama-cpp-python built without CUDA: "
    "rebuild with CMAKE_ARGS=-DGGML_CUDA=on pip install --force-reinstall llama-cpp-python"
)


def unavailable(device: str) -> str | None:
    """Why this runtime cannot run on `device` here, or None."""
    import llama_cpp

    if device == "cuda" and not llama_cpp.llama_supports_gpu_offload():
        return CUDA_MISSING
    return None


class LlamaCppSession:
    def __init__(self, model_path: str, threads: int, n_ctx: int, device: str = "cpu"):
        import llama_cpp

        n_batch = min(512, n_ctx)  # a 512-token prompt is one batch, as in llama-bench's pp512
        gpu_layers = -1 if device == "cuda" else 0
        self.llm = llama_cpp.Llama(
            model_path=model_path,
            n_ctx=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            n_batch=n_batch,
            n_gpu_layers=gpu_layers,
            logits_all=False,
            verbose=False,
        )
        self._get_logits = llama_cpp.llama_get_logits_ith
        self._n_vocab = self.llm.n_vocab()
        self.info = {
            "backends": "CUDA" if device == "cuda" else "CPU",
            "n_batch": n_batch,
            "n_ubatch": n_batch,
            "n_gpu_layers": gpu_layers,
            "type_k": "f16",
            "type_v": "f16",
            "use_mmap": True,
            "runtime_version": f"llama-cpp-python {llama_cpp.__version__}",
        }

    def reset(self) -> None:
        self.llm.reset()

    def feed(self, ids: list[int]) -> None:
        self.llm.eval(ids)

    def argmax(self) -> int:
        # Llama.eval keeps no logits unless logits_all; read the last position's from the context
        logits = np.ctypeslib.as_array(self._get_logits(self.llm.ctx, -1), shape=(self._n_vocab,))
        return int(np.argmax(logits))

    def close(self) -> None:
        self.llm.close()


def bench(model_path: str, prompt_ids: list[int], gen_tokens: int, runs: int, threads: int, **kw) -> dict:
    """Time `model_path` (a GGUF); keyword options as stats.run_bench (short_ids, device, monitor, progress)."""
    return run_bench("llama_cpp", LlamaCppSession, model_path, prompt_ids, gen_tokens, runs, threads, **kw)


def tokenize(model_path: str, text: str) -> list[int]:
    """Token ids of `text` with the GGUF's own tokenizer (vocabulary only, no weights loaded)."""
    from llama_cpp import Llama

    from toolchain.native_output import captured_native_output

    with captured_native_output():  # a vocab-only load still prints a context warning
        llm = Llama(model_path=model_path, vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    finally:
        llm.close()
