"""Bad input gives a one-line error, never a traceback or a half-written file."""

import errno
import json
import shutil
import subprocess
import sys

import gguf
import pytest

from toolchain.cli import main
from toolchain.errors import UserError
from toolchain.export.gguf import export_gguf, write_gguf
from toolchain.inspect_model import inspect_path
from toolchain.models.load import load_model


@pytest.fixture(scope="module")
def f16(tiny_dir, tmp_path_factory):
    return write_gguf(tiny_dir, tmp_path_factory.mktemp("bad") / "model-F16.gguf", "F16")


def _cli(capsys, *argv):
    rc = main(list(argv))
    err = capsys.readouterr().err.strip()
    return rc, err


def test_truncated_and_corrupt_gguf(f16, tmp_path, capsys):
    data = f16.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    rc, err = _cli(capsys, "inspect", str(cut))
    assert rc == 2 and "truncated" in err and "Traceback" not in err and len(err.splitlines()) == 1
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    with pytest.raises(UserError, match="truncated or corrupt"):
        inspect_path(str(junk))
    with pytest.raises(UserError, match="truncated|corrupt"):
        load_model(str(cut))
    info = inspect_path(str(f16))  # the intact file still reads, with per-tensor types
    assert info["architecture"] == "llama" and any(" F16 " in t for t in info["tensor_list"])


def test_truncated_safetensors(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "m"
    shutil.copytree(tiny_dir, bad)
    st = bad / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-1000])
    rc, err = _cli(capsys, "export", "gguf", str(bad), "--out", str(tmp_path / "out"), "--types", "F16")
    assert rc == 2 and "truncated" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "model-F16.gguf").exists()
    st.write_bytes(b"\xff" * 64)
    with pytest.raises(UserError, match="not a valid safetensors"):
        load_model(str(bad))


def test_unknown_architecture(tiny_dir, tmp_path, capsys):
    odd = tmp_path / "m"
    shutil.copytree(tiny_dir, odd)
    cfg = json.loads((odd / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (odd / "config.json").write_text(json.dumps(cfg))
    rc, err = _cli(capsys, "export", "gguf", str(odd), "--out", str(tmp_path / "out"), "--types", "F16")
    assert rc == 2 and "'mamba' is not supported" in err and "qwen3" in err


_ENOSPC_SCRIPT = """
import sys
from toolchain.export.gguf import export_gguf
try:
    export_gguf(sys.argv[1], sys.argv[2], ["F16"])
except OSError as e:
    print("ERRNO", e.errno)
"""


def test_disk_full_leaves_no_file(tiny_dir, tmp_path, monkeypatch):
    """A real full disk (a 1 MB tmpfs in a user namespace) where that can be mounted; otherwise
    the writer's file raises ENOSPC midway. Either way nothing is left at the final path."""
    out = tmp_path / "full"
    out.mkdir()
    probe = (
        subprocess.run(
            ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {out}"], capture_output=True, timeout=60
        )
        if shutil.which("unshare")
        else None
    )
    if probe is not None and probe.returncode == 0:
        script = tmp_path / "enospc.py"
        script.write_text(_ENOSPC_SCRIPT)
        cmd = (
            f"mount -t tmpfs -o size=1m tmpfs {out} && {sys.executable} {script} {tiny_dir} {out} "
            f"&& ls -A {out} | wc -l"
        )
        res = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, timeout=300)
        lines = res.stdout.split()
        assert "ERRNO" in lines and str(errno.ENOSPC) in lines, res.stdout + res.stderr
        assert lines[-1] == "0"  # nothing in the (full) output directory: no final file, no temp file
        return

    def fill_up(self, *a, **k):
        self.fout[0].write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fill_up)
    with pytest.raises(OSError) as e:
        export_gguf(tiny_dir, out, ["F16"])
    assert e.value.errno == errno.ENOSPC and list(out.iterdir()) == []
