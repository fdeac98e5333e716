"""What every per-architecture module provides (see registry.py for how one is found)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

# (hf tensor name, fp32 array, config) -> [(gguf-ready hf name, array)]; lets a family rewrite
# a tensor (llama's rotary row permutation, gemma's norm offset) before name mapping.
TensorTransform = Callable[[str, np.ndarray, object], np.ndarray]


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    gguf_arch: str  # gguf.MODEL_ARCH member name, e.g. "LLAMA"
    # dotted attribute path to the ModuleList of decoder blocks
    layers_attr: str
    # writes architecture hyper-parameters into a gguf.GGUFWriter
    write_hparams: Callable[[object, object], None]
    # tensor rewrite before writing; identity by default
    transform: TensorTransform
    # HF tensor names never written (e.g. the output head when embeddings are tied)
    skip: Callable[[str, object], bool]
    # per-block RMSNorm modules over the model width, for width pruning; empty: no pruning rule
    block_norms: tuple[str, ...] = ()
    # llama.cpp's graph for this family sizes the q/o projections by the model width, so a
    # pruned model must keep hidden_size == num_attention_heads * head_dim
    width_is_heads: bool = False
    # the norms multiply by (norm_offset + weight): 1 for Gemma's RMSNorm
    norm_offset: float = 0.0
    # the embeddings are scaled by sqrt(hidden_size) (Gemma), so a narrower config scales them less
    embed_scale_follows_width: bool = False
    # onnxruntime-genai's name for this family (genai_config.json "model.type"); None: not packed for it
    genai_type: str | None = None

    def _layers_parent(self, model):
        parent_path, _, attr = self.layers_attr.rpartition(".")
        parent = model
        for part in parent_path.split(".") if parent_path else []:
            parent = getattr(parent, part)
        return parent, attr

    def decoder_layers(self, model):
        parent, attr = self._layers_parent(model)
        return getattr(parent, attr)

    def set_decoder_layers(self, model, layers) -> None:
        parent, attr = self._layers_parent(model)
        setattr(parent, attr, layers)

    def gguf_tensors(self, state_dict: dict, config) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (hf name, fp32 array ready for GGUF) in state-dict order."""
        for name, tensor in state_dict.items():
            if self.skip(name, config):
                continue
            data = tensor.detach().float().cpu().numpy()
            yield name, self.transform(name, data, config)
