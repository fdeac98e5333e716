"""Exports: GGUF (+ Ollama Modelfile) and ONNX, and their verification against torch."""
