"""Exports: GGUF (+ Ollama Modelfile) and ONNX decoders. Checking them is the verify stage."""
