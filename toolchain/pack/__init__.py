"""Ship it: the app bundle (build.py), its model card and onnxruntime-genai config."""
