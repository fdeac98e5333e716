import pytest

from toolchain.bench.run import bench_models
from toolchain.bench.targets import Target, load_target
from toolchain.errors import UserError
from toolchain.export.gguf import export_gguf


@pytest.fixture(scope="module")
def q8(tiny_dir, tmp_path_factory):
    return export_gguf(tiny_dir, tmp_path_factory.mktemp("bench"), ["Q8_0"])


def test_cpu_target_loads():
    t = load_target("cpu")
    assert t.kind == "cpu" and t.threads >= 1 and t.memory_bandwidth_gbps > 0


def test_bad_targets(tmp_path):
    with pytest.raises(UserError, match="unknown target 'tpu9'"):
        load_target("tpu9")
    bad = tmp_path / "t.yaml"
    bad.write_text("name: x\nkind: quantum\nthreads: 1\nmemory_budget_mb: 1\nmemory_bandwidth_gbps: 1\n")
    with pytest.raises(UserError, match="kind 'quantum'"):
        load_target(str(bad))
    bad.write_text("name: x\nkind: cpu\nthreads: 1\nmemory_budget_mb: 1\nmemory_bandwidth_gbps: 1\ncolour: red\n")
    with pytest.raises(UserError, match="unknown key 'colour'"):
        load_target(str(bad))


def test_llama_cpp_bench_in_child_process(q8):
    target = Target(name="one-core", kind="cpu", threads=1, memory_budget_mb=1024, memory_bandwidth_gbps=10)
    (r,) = bench_models(q8, target, prompt_tokens=32, gen_tokens=16, runs=3, progress=lambda m: None)
    assert r["runtime"] == "llama_cpp" and r["threads"] == 1 and r["n_prompt"] == 32 and r["n_gen"] == 16
    assert len(r["decode_tps"]["runs"]) == 3
    assert r["decode_tps"]["median"] > 0 and r["prefill_tps"]["median"] > 0 and r["ttft_ms"]["median"] > 0
    assert r["peak_rss_mb"] > 0
    assert not r["torch_imported"]  # the bench child runs without torch (device mode)
    # pinned to one core: CPU time cannot exceed wall time (plus a little for the interpreter)
    assert r["cpu_per_wall"] <= 1.1
