"""The package as users install it: a wheel built from the repository, installed into a fresh
venv outside the checkout, finds its target profiles (package data) and benchmarks a GGUF."""

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from toolchain.export.gguf import export_gguf

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv holding only the built wheel; the heavy dependencies come from this interpreter's
    site-packages through a .pth file, so nothing is downloaded and no source tree is on the path."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", REPO],
        check=True,
        cwd=tmp,
    )
    (wheel,) = (tmp / "dist").glob("toolchain-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()] or [
        sysconfig.get_paths()["purelib"]
    ]
    (Path(site) / "deps.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], check=True)
    return venv


def test_installed_wheel_benches_on_a_shipped_target(installed, tiny_dir, tmp_path):
    (gguf,) = export_gguf(tiny_dir, tmp_path / "export", ["Q8_0"])
    py = installed / "bin" / "python"
    where = subprocess.run(
        [py, "-c", "import toolchain, toolchain.targets as t; print(toolchain.__file__); print(t.known_targets())"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout.splitlines()
    assert str(installed) in where[0] and str(REPO) not in where[0]  # the installed copy, not the checkout
    assert "cpu" in where[1] and "phone-mid" in where[1]
    out = tmp_path / "bench.json"
    subprocess.run(
        [
            installed / "bin" / "toolchain",
            "bench",
            gguf["path"],
            "--target",
            "cpu",
            "--runs",
            "3",
            "--prompt-tokens",
            "16",
            "--short-prompt-tokens",
            "8",
            "--gen-tokens",
            "4",
            "--json",
            out,
        ],
        check=True,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    rows = json.loads(out.read_text())
    rows = rows if isinstance(rows, list) else rows.get("results", rows)
    assert any(r.get("target") == "cpu" and (r.get("decode_tps") or {}).get("median", 0) > 0 for r in rows), rows
