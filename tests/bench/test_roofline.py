"""Roofline, memory-budget and projection arithmetic (no model runs)."""

import pytest

from toolchain.bench import roofline as rl
from toolchain.bench.model_facts import bytes_per_token, hf_facts

FACTS = {
    "n_layers": 10,
    "n_kv_heads": 3,
    "head_dim_k": 64,
    "head_dim_v": 64,
    "kv_bytes_per_elem": 2,
    "weights_bytes": 100 * 2**20,
}


def test_untied_output_counts_whole_and_input_embedding_one_row():
    vocab, width = 1000, 8
    tensors = [
        {"name": "emb", "n_bytes": vocab * width * 2},
        {"name": "out", "n_bytes": vocab * width * 2},
        {"name": "blk", "n_bytes": 500},
    ]
    assert bytes_per_token(tensors, "emb", "out", vocab) == width * 2 + vocab * width * 2 + 500
    # tied: the one table is the output layer, read whole
    assert bytes_per_token(tensors[:1] + tensors[2:], "emb", None, vocab) == vocab * width * 2 + 500


def test_hf_dir_tied_embeddings_read_whole(tiny_dir):
    facts = hf_facts(tiny_dir)
    assert facts["tied_embeddings"] and facts["bytes_per_token"] == facts["weights_bytes"]
    assert facts["n_layers"] == 4 and facts["n_kv_heads"] == 2 and facts["head_dim_k"] == 16
    assert facts["kv_bytes_per_elem"] == 4


def test_kv_cache_and_memory_budget():
    # 2 (K and V) * layers * kv heads * head_dim * context * bytes
    assert rl.kv_cache_bytes(FACTS, 2048) == 2 * 10 * 3 * 64 * 2048 * 2
    m = rl.memory_check(FACTS, 2048, budget_mb=200)
    assert m["fits"] and m["memory_needed_mb"] == pytest.approx(100 + 2 * 10 * 3 * 64 * 2048 * 2 / 2**20, abs=0.1)
    assert not rl.memory_check(FACTS, 2048, budget_mb=100)["fits"]


def test_ceiling_efficiency_and_projection():
    r = rl.roofline(decode_tps=100, bytes_per_token=50_000_000, bandwidth_gbps=20, source="measured")
    assert r["ceiling_tps"] == pytest.approx(400) and r["efficiency"] == pytest.approx(0.25)
    p = rl.projection(target_bandwidth_gbps=17.1, bytes_per_token=50_000_000, efficiency=0.25)
    assert p["label"] == "projection"
    assert p["decode_tps"] == pytest.approx(17.1e9 / 50e6 * 0.25, rel=1e-3)  # 85.5 tok/s
    assert "target_bandwidth / bytes_per_token * efficiency_here" in p["formula"] and "85.5 tok/s" in p["formula"]


def test_bandwidth_probe_is_plausible_and_cached():
    bw = rl.probe_bandwidth(1, mb=256)
    assert 0.5 < bw < 1000  # GB/s: any real machine
    assert rl.probe_bandwidth(1, mb=256) == bw  # measured once per process


def test_onnx_facts_without_the_onnx_package(tmp_path, monkeypatch):
    import json
    import sys

    from toolchain.bench.model_facts import onnx_facts

    info = {
        "model_type": "llama",
        "num_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_size": 64,
        "vocab_size": 100,
        "dtype": "float32",
    }
    (tmp_path / "model_info.json").write_text(json.dumps(info))
    (tmp_path / "model.onnx").write_bytes(b"\0" * 1000)
    (tmp_path / "model.onnx.data").write_bytes(b"\0" * 4000)
    monkeypatch.setitem(sys.modules, "onnx", None)  # device mode: `import onnx` fails
    f = onnx_facts(tmp_path / "model.onnx")
    assert f["bytes_per_token"] == f["weights_bytes"] == 5000 and not f["bytes_per_token_exact"]
    assert rl.kv_cache_bytes(f, 10) == 2 * 2 * 2 * 16 * 10 * 4
