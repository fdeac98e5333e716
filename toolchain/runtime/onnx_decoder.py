"""Decode with an exported ONNX decoder (toolchain/export/onnx.py) on onnxruntime, without torch.

This module must stay importable where neither torch nor transformers is installed: it uses
numpy, onnxruntime and (for `load_tokenizer`) the small `tokenizers` package only.

The KV cache lives here as numpy arrays [1, kv_heads, seq, head_dim] per layer; it starts
empty (seq = 0), which the exported graph accepts, so prefill and decode are the same call.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from toolchain.errors import UserError
from toolchain.formats import ONNX_INFO_FILE as INFO_FILE
from toolchain.formats import ONNX_MODEL_FILE as MODEL_FILE


def load_tokenizer(model_dir: str | Path):
    """The exported directory's tokenizer.json as a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))


def _bad_file(path: Path, e: Exception) -> UserError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return UserError(f"{path} is not a readable ONNX model ({first}); re-export it (toolchain export onnx)")


def read_info(model_dir: Path) -> dict:
    """The folder's model_info.json, or one clear error saying what is missing or broken."""
    f = model_dir / INFO_FILE
    if not (model_dir / MODEL_FILE).is_file():
        raise UserError(f"{model_dir} holds no {MODEL_FILE}; give a folder written by toolchain export onnx")
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        raise UserError(f"{model_dir} has no {INFO_FILE}; it was not written by toolchain export onnx") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{f} is not valid JSON ({e}); re-export the model") from None


def load_graph(model_file: str | Path):
    """The ONNX graph without its weights (`onnx` package), or one clear error for a corrupt file."""
    import onnx

    try:
        return onnx.load(str(model_file), load_external_data=False)
    except FileNotFoundError:
        raise UserError(f"ONNX model not found: {model_file}") from None
    except Exception as e:  # protobuf's DecodeError and friends: the file is damaged or not ONNX
        raise _bad_file(Path(model_file), e) from None


class OnnxDecoder:
    """Batch-1 greedy/sampled decoding with a KV cache held between `forward` calls."""

    def __init__(self, model_dir: str | Path, threads: int = 0, providers: list[str] | None = None):
        model_dir = Path(model_dir)
        if model_dir.is_file():  # accept the model.onnx path as well as its directory
            model_dir = model_dir.parent
        self.model_dir = model_dir
        self.info = read_info(model_dir)
        opts = ort.SessionOptions()
        if threads > 0:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(
                str(model_dir / MODEL_FILE), sess_options=opts, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime's InvalidProtobuf / Fail: a truncated or corrupt file
            raise _bad_file(model_dir / MODEL_FILE, e) from None
        self.n_layers = int(self.info["num_layers"])
        self.kv_heads = int(self.info["num_key_value_heads"])
        self.head_dim = int(self.info["head_dim"])
        self.eos_ids = list(self.info.get("eos_token_id") or [])
        self.input_names = self.info["inputs"]
        self.output_names = self.info["outputs"]
        self.reset()

    def reset(self) -> None:
        """Forget the cache (start a new sequence)."""
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        self._past = [empty] * (2 * self.n_layers)
        self.n_past = 0

    def forward(self, ids: list[int]) -> np.ndarray:
        """Feed `ids` after the cached tokens; return their logits [len(ids), vocab]."""
        n = len(ids)
        if n == 0:
            raise ValueError("forward needs at least one token")
        feeds: dict[str, np.ndarray] = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            # no padding at batch 1: every cached and new position is attended
            "attention_mask": np.ones((1, self.n_past + n), dtype=np.int64),
            "position_ids": np.arange(self.n_past, self.n_past + n, dtype=np.int64)[None, :],
        }
        feeds.update(zip(self.input_names[3:], self._past))
        out = self.session.run(self.output_names, feeds)
        self._past = out[1:]
        self.n_past += n
        return out[0][0]

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        greedy: bool = True,
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        stop_ids: list[int] | None = None,
    ) -> list[int]:
        """New token ids after `prompt_ids` (stops after a stop id, which is included)."""
        if max_new_tokens <= 0:
            return []
        stop = set(self.eos_ids if stop_ids is None else stop_ids)
        rng = np.random.default_rng(seed)
        self.reset()
        logits = self.forward(list(prompt_ids))[-1]
        out: list[int] = []
        for _ in range(max_new_tokens):
            tok = pick_token(logits, greedy, temperature, top_k, rng)
            out.append(tok)
            if tok in stop or len(out) == max_new_tokens:
                break
            logits = self.forward([tok])[-1]
        return out


def pick_token(logits: np.ndarray, greedy: bool, temperature: float, top_k: int, rng) -> int:
    """Argmax, or a sample from softmax(logits / temperature) restricted to the top_k."""
    if greedy or temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if 0 < top_k < z.shape[-1]:
        cut = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= cut, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    return int(rng.choice(p.shape[-1], p=p))
