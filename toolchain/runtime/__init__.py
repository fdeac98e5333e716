"""Torch-free runtimes for exported models (what an app ships: numpy + onnxruntime only)."""
