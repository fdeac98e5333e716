"""torch runner: the eager baseline. Loads the HF directory with transformers, greedy decode with
a KV cache. The only bench module that imports torch, and only when the torch runtime is asked for.
"""

from __future__ import annotations

from typing import Any

from toolchain.bench.stats import run_bench


def unavailable(device: str) -> str | None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


class TorchSession:
    def __init__(self, model_path: str, threads: int, n_ctx: int, device: str = "cpu"):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.device = torch.device("cuda" if device == "cuda" else "cpu")
        # the checkpoint's own dtype (fp32 for our students): the baseline the exports are compared with
        # (Any: transformers' stubs wrap PreTrainedModel.to so that mypy rejects a device argument)
        model: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto")
        self.model: Any = model.to(self.device).eval()
        self._cache: Any = None  # the transformers KV cache of the current sequence
        self._next: Any = None  # the last position's logits (a tensor) once fed
        self.info = {
            "backends": "CUDA" if device == "cuda" else "CPU",
            "n_batch": None,
            "n_gpu_layers": None,  # one call per prompt
            "runtime_version": f"torch {torch.__version__}, transformers {transformers.__version__}",
        }

    def reset(self) -> None:
        from transformers import DynamicCache

        self._cache = DynamicCache()
        self._next = None

    def feed(self, ids: list[int]) -> None:
        torch = self.torch
        with torch.inference_mode():
            x = torch.tensor([ids], dtype=torch.long, device=self.device)
            # logits of the last position only, as llama.cpp computes them (logits_all=False)
            out = self.model(input_ids=x, past_key_values=self._cache, use_cache=True, logits_to_keep=1)
            self._cache = out.past_key_values
            self._next = out.logits[0, -1]

    def argmax(self) -> int:
        return int(self._next.argmax())  # .item() waits for the device: the step is fully timed

    def close(self) -> None:
        self.model = None


def bench(model_path: str, prompt_ids: list[int], gen_tokens: int, runs: int, threads: int, **kw) -> dict:
    """`model_path`: an HF model directory; options as stats.run_bench."""
    return run_bench("torch", TorchSession, model_path, prompt_ids, gen_tokens, runs, threads, **kw)
