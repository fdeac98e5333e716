"""The real Gemma-3-270M: our F16 GGUF computes what torch computes, and talks sense in llama.cpp."""

import pytest

from toolchain.config import VerifyConfig


@pytest.mark.slow
def test_gemma3_270m_f16_matches_torch_and_generates(tmp_path):
    from toolchain.export.gguf import write_gguf
    from toolchain.models.load import resolve_model_dir
    from toolchain.runtime.llama import open_llama
    from toolchain.verify.gguf import verify_gguf

    model_dir = resolve_model_dir("gemma3-270m")  # converted once from the bundled GGUF, cached
    path = write_gguf(model_dir, tmp_path / "model-F16.gguf", "F16")
    v = VerifyConfig()
    # a prompt longer than the 512-token sliding window, so local and global layers both matter
    from pydoc_data.topics import topics

    long_prompt = topics["class"]
    res = verify_gguf(
        model_dir, path, "F16", v.prompts[:1] + [long_prompt], 8, v.max_nmse, v.min_greedy_agreement, threads=1
    )
    assert res["tokenizer_parity"] == 1.0
    assert res["nmse_max"] <= 1e-4 and res["decode_nmse_max"] <= 1e-4
    with open_llama(path, n_ctx=256, logits_all=False) as llm:
        text = llm.create_completion("The capital of France is", max_tokens=12, temperature=0)["choices"][0]["text"]
    print("llama.cpp sample:", repr(text))
    assert "Paris" in text or "capital" in text
