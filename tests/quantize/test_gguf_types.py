"""Every GGUF type in one command, and per-tensor overrides in both the Python and llama.cpp paths."""

import gguf
import pytest

from toolchain.errors import UserError
from toolchain.export.gguf import export_gguf
from toolchain.formats import SUPPORTED_TYPES, check_overrides


def _types(path):
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def test_all_types_in_one_command_load_in_llama_cpp(tiny_dir, tmp_path):
    from llama_cpp import Llama

    from toolchain.formats import NEEDS_IMATRIX

    types = [t for t in SUPPORTED_TYPES if t not in NEEDS_IMATRIX]  # those: tests/quantize/test_imatrix.py
    recs = export_gguf(tiny_dir, tmp_path, types)
    assert sorted(r["quant"] for r in recs) == sorted(types)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"model-{t}.gguf" for t in types)
    by_type = {r["quant"]: r for r in recs}
    assert _types(by_type["Q5_1"]["path"])["blk.0.ffn_up.weight"] == "Q5_1"
    assert _types(by_type["BF16"]["path"])["blk.0.ffn_up.weight"] == "BF16"
    assert by_type["Q4_0"]["bytes"] < by_type["Q8_0"]["bytes"] < by_type["F16"]["bytes"] < by_type["F32"]["bytes"]
    for r in recs:
        llm = Llama(model_path=r["path"], n_ctx=64, verbose=False, n_threads=1)
        llm.eval(llm.tokenize(b"Hello world"))
        llm.close()


def test_overrides_python_and_llama_cpp_paths(tiny_dir, tmp_path):
    recs = export_gguf(
        tiny_dir, tmp_path, ["F16", "Q4_0", "Q4_K_M"], overrides={"token_embd": "Q8_0", r"blk\.0\.ffn_down": "F16"}
    )
    f16, q4, q4k = (_types(r["path"]) for r in recs)
    assert f16["token_embd.weight"] == "F16"  # the reference file is never overridden
    assert q4["token_embd.weight"] == "Q8_0" and q4["blk.0.ffn_down.weight"] == "F16"
    assert q4["blk.1.ffn_down.weight"] == "Q4_0"
    assert q4k["token_embd.weight"] == "Q8_0" and q4k["blk.0.ffn_down.weight"] == "F16"


def test_bad_overrides_refused(tiny_dir, tmp_path):
    with pytest.raises(UserError, match="written in Python"):
        check_overrides({"token_embd": "Q6_K"}, "Q8_0")
    with pytest.raises(UserError, match="not a valid regex"):
        check_overrides({"(": "Q8_0"}, "Q4_K_M")
    with pytest.raises(UserError, match="allowed tensor types"):
        export_gguf(tiny_dir, tmp_path, ["Q4_K_M"], overrides={"output": "Q9_9"})
    assert list(tmp_path.iterdir()) == []
