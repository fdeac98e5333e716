"""SIGKILL a real `python -m toolchain distill` after a checkpoint; the rerun must end exactly
where an uninterrupted run with the same seed ends."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from toolchain.models.load import load_model
from toolchain.student import build_student

REPO = Path(__file__).resolve().parents[2]
STEPS = 60


def _cmd(teacher, student, out, work):
    return [
        sys.executable,
        "-m",
        "toolchain",
        "distill",
        "--teacher",
        str(teacher),
        "--student",
        str(student),
        "--out",
        str(out),
        "--work",
        str(work),
        "--no-progress",
        "--steps",
        str(STEPS),
        "--set",
        "distill.checkpoint_every=10",
        "--set",
        "distill.batch_size=2",
        "--set",
        "distill.lr=1e-3",
        "--set",
        "data.seq_len=32",
        "--set",
        "data.eval_sequences=4",
        "--set",
        "distill.threads=1",
    ]


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def _result(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{") :])


def test_sigkill_after_checkpoint_then_rerun_matches_uninterrupted(tiny_dir_6, tmp_path):
    teacher = load_model(str(tiny_dir_6))
    calib = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(0))
    sdir = tmp_path / "init"
    build_student(teacher, sdir, 3, calib)

    ref = subprocess.run(
        _cmd(tiny_dir_6, sdir, tmp_path / "ref", tmp_path / "wref"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ref.returncode == 0, ref.stderr[-2000:]

    work = tmp_path / "w"
    proc = subprocess.Popen(
        _cmd(tiny_dir_6, sdir, tmp_path / "out", work), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt = work / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = torch.load(ckpt, weights_only=False)["step"]
    assert 0 < killed_at < STEPS and not (tmp_path / "out").exists()

    rerun = subprocess.run(
        _cmd(tiny_dir_6, sdir, tmp_path / "out", work), env=_env(), capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    a, b = _result(ref.stdout), _result(rerun.stdout)
    assert a["steps"] == b["steps"] == STEPS and a["tokens"] == b["tokens"]
    for k in ("ce", "kl", "top1_agreement", "ece"):
        assert b["after"][k] == pytest.approx(a["after"][k], rel=1e-5, abs=1e-7), k
    assert b["after"]["kl"] != pytest.approx(b["before"]["kl"], rel=1e-3)  # training did move the student
