"""Verification: does each export compute what the torch model computes?

One torch reference per model (`reference.Reference`), computed once and shared by the GGUF
checks (llama.cpp, `gguf.py`) and the ONNX checks (onnxruntime, `onnx.py`); it models the
export's own rounding (torch with fp16-rounded weights for an F16 GGUF or fp16 ONNX), so a
correct file passes on any model and the thresholds measure the runtime, not the format.
Greedy agreement is counted where the reference's choice is clear (`metrics.greedy_figures`);
near-ties are reported apart. `quality.py` adds perplexity / KLD / top-1 against the F16 file.
`exports.verify_exports` runs every check of a run and fails with all the figures.
"""
