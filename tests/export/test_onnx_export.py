"""ONNX path: export with KV cache, torch-free decoding, verification against torch, bench runner.

The tiny model is exported once per session (conftest `tiny_onnx`, every precision; ~20 s on
2 cores when idle, torch.export dominates).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from toolchain.errors import UserError, VerificationError

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["The capital of France is", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def exported(tiny_onnx):
    return tiny_onnx


def _torch_logits(model_dir, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_export_layout_and_names(exported, tiny_dir):
    import onnx

    result, out = exported
    assert result["format"] == "onnx" and result["quant"] == "fp32" and result["exporter"] == "dynamo"
    assert result["path"] == str(out / "model.onnx")
    assert result["bytes"] == (out / "model.onnx").stat().st_size + (out / "model.onnx.data").stat().st_size
    assert len(result["sha256"]) == 64 and result["seconds"] > 0
    # the checksum covers the weights, not only the graph file
    assert set(result["files_sha256"]) == {"model.onnx", "model.onnx.data"}
    for name in ("tokenizer.json", "tokenizer_config.json", "model_info.json"):
        assert (out / name).is_file(), name
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers
    assert sorted(p.name for p in out.parent.iterdir()) == ["onnx", "onnx-fp16", "onnx-int4", "onnx-int8"]

    info = json.loads((out / "model_info.json").read_text())
    config = json.loads((tiny_dir / "config.json").read_text())
    assert info["num_layers"] == 4 and info["num_key_value_heads"] == 2 and info["head_dim"] == 16
    assert info["vocab_size"] == config["vocab_size"] and info["dtype"] == "float32"
    assert isinstance(info["eos_token_id"], list) and info["eos_token_id"]
    assert "im_start" in (info["chat_template"] or "")

    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    inputs = [i.name for i in graph.input]
    outputs = [o.name for o in graph.output]
    assert inputs == info["inputs"] and outputs == info["outputs"]
    assert inputs[:4] == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key"]
    assert outputs[:3] == ["logits", "present.0.key", "present.0.value"]
    assert inputs[-1] == "past_key_values.3.value" and outputs[-1] == "present.3.value"
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert all(isinstance(d, str) for d in dims["input_ids"] + dims["attention_mask"])
    assert isinstance(dims["past_key_values.0.key"][2], str)  # past length is dynamic


def test_ort_matches_torch_with_empty_and_filled_past(exported, tiny_dir):
    from toolchain.runtime.onnx_decoder import OnnxDecoder

    ids = [1, 504, 3458, 282, 4649, 314, 30, 22, 55]
    ref = _torch_logits(tiny_dir, ids)
    dec = OnnxDecoder(exported[1], threads=1)
    # prefill from an empty past (length 0), then 1 token, then several tokens with a past
    got = np.concatenate([dec.forward(ids[:5]), dec.forward(ids[5:6]), dec.forward(ids[6:])])
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-3
    dec.reset()  # a single-token prefill with an empty past works too
    assert np.abs(dec.forward(ids[:1]) - ref[:1]).max() < 1e-3
    assert dec.n_past == 1


def test_generate_sampling_is_seeded(exported):
    from toolchain.runtime.onnx_decoder import OnnxDecoder

    dec = OnnxDecoder(exported[1], threads=1)
    a = dec.generate([1, 504, 3458], 6, greedy=False, temperature=0.8, top_k=20, seed=3, stop_ids=[])
    b = dec.generate([1, 504, 3458], 6, greedy=False, temperature=0.8, top_k=20, seed=3, stop_ids=[])
    assert a == b and len(a) == 6
    greedy = dec.generate([1, 504, 3458], 6, stop_ids=[])
    stop = greedy[2]
    k = greedy.index(stop)  # generation ends at the first stop id, which is included
    assert dec.generate([1, 504, 3458], 6, stop_ids=[stop]) == greedy[: k + 1]


def test_verify_passes_and_fails(exported, tiny_dir, tmp_path):
    from toolchain.verify.onnx import verify_onnx

    r = verify_onnx(tiny_dir, exported[1], PROMPTS, greedy_tokens=8, threads=1)
    assert r["passed"] and r["prompts"] == 2 and r["max_abs_diff"] < 1e-3
    assert r["greedy_agreement"] == 1.0 and r["generate_prefix"] == 1.0 and r["near_tie_flips"] == 0

    # a corrupted weight file must be caught
    broken = tmp_path / "broken"
    shutil.copytree(exported[1], broken)
    with open(broken / "model.onnx.data", "r+b") as f:
        data = np.frombuffer(f.read(), dtype=np.float32).copy()
        data[: data.size // 4] *= 3.0
        f.seek(0)
        f.write(data.tobytes())
    with pytest.raises(VerificationError, match="max \\|logit diff\\|") as err:
        verify_onnx(tiny_dir, broken, PROMPTS[:1], greedy_tokens=4, threads=1)
    assert err.value.figures["max_abs_diff"] > 1e-3


def test_decoder_runs_without_torch(exported):
    # a meta-path blocker makes torch/transformers unimportable, as on a device without them
    code = f"""
import json, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
try:
    import torch
    sys.exit("torch is importable")
except ImportError:
    pass
from toolchain.runtime.onnx_decoder import OnnxDecoder, load_tokenizer
from toolchain.bench.onnxruntime_runner import bench
d = {str(exported[1])!r}
tok = load_tokenizer(d)
ids = tok.encode("The capital of France is", add_special_tokens=False).ids
toks = OnnxDecoder(d, threads=1).generate(ids, 5, stop_ids=[])
bench(d, ids, 2, 1, 1)
# the int4 folder alone, as an app ships it: greedy and sampled text, decoded by `tokenizers`
q = OnnxDecoder(d + "-int4", threads=1)
text = tok.decode(q.generate(ids, 12, stop_ids=[]))
sampled = tok.decode(q.generate(ids, 12, greedy=False, temperature=0.9, top_k=40, seed=1, stop_ids=[]))
print(json.dumps({{"ids": ids, "toks": toks, "text": text, "sampled": sampled, "torch": "torch" in sys.modules}}))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not out["torch"] and len(out["toks"]) == 5
    assert out["text"].strip() and out["sampled"].strip() and out["text"] != out["sampled"]

    from toolchain.runtime.onnx_decoder import OnnxDecoder

    assert OnnxDecoder(exported[1], threads=1).generate(out["ids"], 5, stop_ids=[]) == out["toks"]


def test_interrupted_export_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    import torch

    from toolchain.export.onnx import export_onnx

    def interrupted(*a, **k):
        raise KeyboardInterrupt  # Ctrl-C mid-export: not an exporter failure, no fallback

    monkeypatch.setattr(torch.onnx, "export", interrupted)
    out = tmp_path / "out" / "onnx"
    with pytest.raises(KeyboardInterrupt):
        export_onnx(tiny_dir, out)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # temp dir cleaned up too


def test_exporter_failure_is_a_user_error_naming_both_exporters(tiny_dir, tmp_path, monkeypatch):
    import torch

    from toolchain.export.onnx import export_onnx

    def unsupported(*a, dynamo=True, **k):
        raise RuntimeError(f"Unsupported operator aten::frobnicate ({'dynamo' if dynamo else 'legacy'})")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    out = tmp_path / "out" / "onnx"
    with pytest.raises(UserError, match=r"both exporters.*frobnicate \(dynamo\).*frobnicate \(legacy\)"):
        export_onnx(tiny_dir, out)
    assert list(out.parent.iterdir()) == []


def test_interrupted_quantization_leaves_no_variant(exported, monkeypatch, tmp_path):
    from toolchain.export.onnx import precision_dir, quantize_export
    from toolchain.quantize import onnx_quant

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    src = tmp_path / "onnx"
    shutil.copytree(exported[1], src)
    monkeypatch.setattr(onnx_quant, "to_nbits", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_export(src, "int4")
    assert precision_dir(src, "int4") == tmp_path / "onnx-int4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]  # no variant, no temp dir


def test_bad_precision_is_a_user_error(exported, tiny_dir, tmp_path):
    from toolchain.export.onnx import export_onnx, quantize_export

    with pytest.raises(UserError, match="unknown ONNX precision 'int3'"):
        export_onnx(tiny_dir, tmp_path / "x", ["fp32", "int3"])
    with pytest.raises(UserError, match="quantize from the fp32 export"):
        quantize_export(exported[1].with_name(exported[1].name + "-int4"), "int8")


def test_unsupported_architecture_is_a_user_error(tmp_path):
    from transformers import GPT2Config

    from toolchain.export.onnx import export_onnx

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UserError, match="not supported"):
        export_onnx(tmp_path / "gpt2", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bench_runner(exported):
    from toolchain.bench.onnxruntime_runner import bench

    r = bench(str(exported[1] / "model.onnx"), list(range(100, 132)), gen_tokens=8, runs=3, threads=1)
    assert r["runtime"] == "onnxruntime" and r["n_prompt"] == 32 and r["n_gen"] == 8
    assert r["load_s"] > 0
    for key in ("prefill_tps", "decode_tps"):
        assert len(r[key]["runs"]) == 3 and all(v > 0 for v in r[key]["runs"])
        assert r[key]["median"] > 0 and r[key]["p95"] >= r[key]["median"]
    assert r["ttft_ms"]["median"] > 0 and 0 < r["token_ms"]["p50"] <= r["token_ms"]["p95"]
