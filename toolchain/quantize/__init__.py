"""Quantization: GGUF types (pure Python and llama.cpp K-quants)."""
