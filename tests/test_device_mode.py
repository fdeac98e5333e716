"""Device mode: `toolchain bench` / `inspect` in a venv with only the `bench` extra (no torch).

This is how a user runs the benchmark on a board or phone-class Linux device: install
`toolchain[bench]` (llama-cpp-python, onnxruntime, tokenizers, gguf) and nothing heavy.
"""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def device_venv(tmp_path_factory):
    venv = tmp_path_factory.mktemp("device") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    # pin llama-cpp-python to the version already built here, so pip reuses its cached wheel
    pins = venv.parent / "constraints.txt"
    pins.write_text(f"llama-cpp-python=={importlib.metadata.version('llama-cpp-python')}\n")
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "-c", str(pins), "-e", f"{ROOT}[bench]"],
        check=True,
        capture_output=True,
        text=True,
    )
    return venv


@pytest.fixture(scope="module")
def exports(tiny_dir, tmp_path_factory):
    from toolchain.export.gguf import export_gguf
    from toolchain.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("device-models")
    (gguf,) = export_gguf(tiny_dir, out, ["Q8_0"])
    onnx = export_onnx(tiny_dir, out / "onnx")
    return Path(gguf["path"]), Path(onnx["path"]).parent


def _run(venv, *args):
    return subprocess.run([str(venv / "bin" / "toolchain"), *args], capture_output=True, text=True, cwd=ROOT)


def test_no_torch_in_device_venv(device_venv):
    for mod in ("torch", "transformers"):
        r = subprocess.run([str(device_venv / "bin" / "python"), "-c", f"import {mod}"], capture_output=True)
        assert r.returncode != 0, f"{mod} is importable in the device-mode venv"


def test_bench_runs_without_torch(device_venv, exports):
    gguf, onnx_dir = exports
    r = _run(
        device_venv, "bench", str(gguf), str(onnx_dir), "--runs", "3", "--prompt-tokens", "16", "--gen-tokens", "8"
    )
    assert r.returncode == 0, r.stderr
    assert "llama_cpp" in r.stdout and "onnxruntime" in r.stdout
    r = _run(device_venv, "inspect", str(gguf))
    assert r.returncode == 0 and '"architecture": "llama"' in r.stdout


def test_full_commands_say_what_to_install(device_venv, tiny_dir, tmp_path):
    r = _run(device_venv, "export", "gguf", str(tiny_dir), "--out", str(tmp_path))
    assert r.returncode == 2
    assert "needs the full install" in r.stderr and "toolchain[all]" in r.stderr and "Traceback" not in r.stderr
