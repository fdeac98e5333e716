import os

import pytest

from toolchain.errors import UserError
from toolchain.fileio import atomic_dir, atomic_path, check_writable_dir, write_json


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    final = tmp_path / "model.gguf"
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_replaces_and_keeps_normal_permissions(tmp_path):
    final = tmp_path / "a.json"
    write_json(final, {"x": 1})
    write_json(final, {"x": 2})
    assert final.read_text().strip().endswith("}") and '"x": 2' in final.read_text()
    assert final.stat().st_mode & 0o044  # readable by others (mkstemp alone gives 0600)


def test_atomic_dir_error_keeps_old_version(tmp_path):
    final = tmp_path / "student"
    with atomic_dir(final) as tmp:
        (tmp / "w").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "w").write_text("v2-partial")
        raise RuntimeError
    assert (final / "w").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


def test_check_writable_dir(tmp_path):
    assert check_writable_dir(tmp_path / "new" / "run").is_dir()
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permission bits
            blocker = tmp_path / "file"
            blocker.write_text("")
            with pytest.raises(UserError, match="cannot write"):
                check_writable_dir(blocker / "run")
        else:
            with pytest.raises(UserError, match="cannot write"):
                check_writable_dir(ro / "run")
    finally:
        ro.chmod(0o700)


def test_exclusive_lock_serialises_processes(tmp_path):
    """Two processes in the same locked block never interleave (the cache's GGUF conversion)."""
    import subprocess
    import sys

    log = tmp_path / "log"
    code = (
        "import sys, time\n"
        "from toolchain.fileio import exclusive_lock\n"
        f"with exclusive_lock({str(tmp_path / 'x.lock')!r}):\n"
        f"    open({str(log)!r}, 'a').write(sys.argv[1] + '-in\\n')\n"
        "    time.sleep(0.4)\n"
        f"    open({str(log)!r}, 'a').write(sys.argv[1] + '-out\\n')\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, name]) for name in ("a", "b")]
    assert [p.wait() for p in procs] == [0, 0]
    lines = log.read_text().split()
    assert sorted(lines) == ["a-in", "a-out", "b-in", "b-out"]
    first = lines[0][0]
    assert lines[:2] == [f"{first}-in", f"{first}-out"]  # the second entered only after the first left
