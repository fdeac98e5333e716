"""The bench end to end on a tiny GGUF: rows, skips, memory budget, pinning, roofline, projection."""

import importlib.util
import json
import subprocess
import sys

import pytest

from toolchain.bench import run as bench_run
from toolchain.bench.model_facts import gguf_facts
from toolchain.bench.run import bench_models, bench_targets, describe_model
from toolchain.export.gguf import export_gguf
from toolchain.targets import Target, load_target

PHONE = Target(
    name="tiny-phone",
    kind="mobile-class",
    threads=1,
    memory_budget_mb=1024,
    memory_bandwidth_gbps=17.1,
    runtimes=["llama_cpp"],
    quant_types=["Q8_0"],
    context=512,
)
QUIET = {"progress": lambda m: None}


@pytest.fixture(scope="module")
def q8(tiny_dir, tmp_path_factory):
    return export_gguf(tiny_dir, tmp_path_factory.mktemp("bench"), ["Q8_0"])


@pytest.fixture
def no_worker(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the model should not have been run")

    monkeypatch.setattr(bench_run, "_run_worker", fail)


def test_tied_gguf_bytes_per_token_is_the_sum_of_tensor_bytes(q8):
    from gguf import GGUFReader

    tensors = GGUFReader(q8[0]["path"]).tensors  # the reference reader, independent of ours
    facts = gguf_facts(q8[0]["path"])
    assert facts["tied_embeddings"] and "output.weight" not in {t.name for t in tensors}
    assert facts["bytes_per_token"] == sum(int(t.n_bytes) for t in tensors) == facts["weights_bytes"]
    assert facts["n_params"] == sum(int(t.n_elements) for t in tensors)
    assert (facts["n_layers"], facts["n_kv_heads"], facts["head_dim_k"]) == (4, 2, 16)


def test_pinned_one_thread_mobile_target(q8, tmp_path):
    lines = []
    one_core = Target(name="one-core", kind="cpu", threads=1, memory_budget_mb=1024, memory_bandwidth_gbps=10)
    r, same = bench_targets(
        q8, [PHONE, one_core], 64, 16, 5, progress=lines.append, out_dir=tmp_path, short_prompt_tokens=8
    )
    # the same run here (1 pinned thread) serves both targets: measured once
    assert same["measured_for"] == "tiny-phone" and same["decode_tps"] == r["decode_tps"]
    assert same["projection"] is None and same["roofline"]["ceiling_tps"] == r["roofline"]["ceiling_tps"]
    assert sum("run 5/5" in m for m in lines) == 1
    assert r["runtime"] == "llama_cpp" and r["target"] == "tiny-phone" and r["threads"] == 1
    assert (r["n_prompt"], r["n_prompt_short"], r["n_gen"]) == (64, 8, 16)
    assert r["fits"] is True and r["skipped"] is None
    # every disturbed run is either re-run (and said so) or kept (and counted)
    assert r["contended_runs"] == sum("re-running" in m for m in lines) + r["contended_kept"]
    for key in ("prefill_tps", "prefill_short_tps", "decode_tps", "ttft_ms"):
        assert len(r[key]["runs"]) == 5 and r[key]["median"] > 0
    assert 0 < r["token_ms"]["p50"] <= r["token_ms"]["p95"] and r["load_s"] > 0 and r["peak_rss_mb"] > 0
    assert not r["torch_imported"]  # the bench child runs without torch (device mode)
    # pinned to one core: CPU time cannot exceed wall time (plus a little for the interpreter)
    assert r["cpu_per_wall"] <= 1.1
    # roofline on this machine's measured bandwidth; projection from the profile's
    roof, proj = r["roofline"], r["projection"]
    assert roof["bandwidth_source"] == "measured" and roof["bandwidth_1thread_gbps"] > 0
    assert roof["bytes_per_token"] == gguf_facts(q8[0]["path"])["bytes_per_token"]
    assert roof["efficiency"] == pytest.approx(r["decode_tps"]["median"] / roof["ceiling_tps"], rel=1e-2)
    assert proj["label"] == "projection" and "17.1 GB/s" in proj["formula"]
    assert proj["decode_tps"] == pytest.approx(17.1e9 / roof["bytes_per_token"] * roof["efficiency"], rel=1e-3)
    # llama-bench fields: the decode test at the row level, all three tests in llama_bench
    assert r["n_threads"] == 1 and r["model_n_params"] > 0 and r["avg_ts"] > 0 and len(r["samples_ns"]) == 5
    assert [(t["n_prompt"], t["n_gen"], t["n_depth"]) for t in r["llama_bench"]] == [(64, 0, 0), (8, 0, 0), (0, 16, 64)]
    # one JSON per model run, and progress while it runs
    assert json.loads((tmp_path / "llama_cpp-Q8_0-tiny-phone.json").read_text()) == r
    assert lines[0].startswith("bench [1/2] llama_cpp Q8_0 on tiny-phone")


def test_model_over_the_memory_budget_is_not_run(q8, no_worker):
    small = Target(
        name="watch", kind="mobile-class", threads=1, memory_budget_mb=1, memory_bandwidth_gbps=5, context=4096
    )
    (r,) = bench_models(q8, small, 64, 16, 5, **QUIET)
    assert r["fits"] is False and r["skipped"] is None and r["decode_tps"] is None
    m = r["memory"]
    assert r["memory_needed_mb"] == m["memory_needed_mb"] > 1 and m["kv_cache_mb"] == pytest.approx(
        2 * 4 * 2 * 16 * 4096 * 2 / 2**20, abs=0.1
    )  # K+V, 4 layers, 2 KV heads, head_dim 16, f16


def test_runtime_not_installed_is_skipped_with_the_reason(q8, monkeypatch, no_worker):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    (r,) = bench_models(q8, PHONE, 64, 16, 5, **QUIET)
    assert "not installed" in r["skipped"] and "pip install llama-cpp-python" in r["skipped"]
    assert r["decode_tps"] is None


def test_runtime_or_quant_outside_the_target_is_skipped(q8, no_worker):
    no_llama = Target(
        name="t", kind="cpu", threads=1, memory_budget_mb=1024, memory_bandwidth_gbps=5, runtimes=["onnxruntime"]
    )
    (r,) = bench_models(q8, no_llama, 64, 16, 5, **QUIET)
    assert "runtime llama_cpp is not in target t's runtimes" in r["skipped"]
    only_q4 = Target(
        name="t", kind="cpu", threads=1, memory_budget_mb=1024, memory_bandwidth_gbps=5, quant_types=["Q4_0"]
    )
    (r,) = bench_models(q8, only_q4, 64, 16, 5, **QUIET)
    assert "quant type Q8_0 is not in target t's quant_types" in r["skipped"]


def test_cuda_target_without_cuda_is_skipped_with_the_reason(q8):
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python can offload to a GPU")
    (r,) = bench_models(q8, load_target("cuda"), 64, 16, 5, **QUIET)
    assert "llama-cpp-python built without CUDA" in r["skipped"] and "CMAKE_ARGS=-DGGML_CUDA=on" in r["skipped"]


def test_torch_runner_is_the_eager_baseline(tiny_dir):
    from toolchain.bench import torch_runner

    r = torch_runner.bench(str(tiny_dir), list(range(100, 132)), 8, 2, 1, short_ids=list(range(100, 108)))
    assert r["runtime"] == "torch" and r["n_prompt"] == 32 and r["n_prompt_short"] == 8
    assert r["decode_tps"]["median"] > 0 and r["prefill_short_tps"]["median"] > 0
    assert describe_model(tiny_dir)["format"] == "hf"


def test_bench_path_imports_no_torch():
    code = (
        "import sys, toolchain.bench.run, toolchain.bench.worker, toolchain.bench.llama_cpp_runner, "
        "toolchain.bench.onnxruntime_runner, toolchain.bench.roofline, toolchain.bench.model_facts; "
        "bad = [m for m in ('torch', 'transformers', 'toolchain.config') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
