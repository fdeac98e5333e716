"""Structured pruning of a decoder: width (hidden channels, heads in whole KV groups, MLP
neurons) and depth, by importance measured on calibration data, to a standard homogeneous
config that transformers loads and the GGUF/ONNX exports take unchanged."""

from toolchain.prune.axes import Shape
from toolchain.prune.cut import prune_model
from toolchain.prune.run import prune_student

__all__ = ["Shape", "prune_model", "prune_student"]
