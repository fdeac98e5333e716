"""`accelerate launch` with 2 processes (gloo on this CPU machine) runs `toolchain distill` unchanged: the result
equals one process with twice the gradient accumulation - the same micro-batches, the same
token-weighted mean - and only process 0 writes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from toolchain.models.load import load_model
from toolchain.student import build_student

REPO = Path(__file__).resolve().parents[2]
STEPS = 4


def _free_port() -> int:
    """A port nothing listens on now, so parallel CI jobs on one machine do not collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(teacher, student, out, accum: int) -> list[str]:
    return [
        "-m",
        "toolchain",
        "distill",
        "--teacher",
        str(teacher),
        "--student",
        str(student),
        "--out",
        str(out),
        "--no-progress",
        "--steps",
        str(STEPS),
        "--set",
        "distill.batch_size=2",
        "--set",
        f"distill.grad_accum={accum}",
        "--set",
        "distill.lr=1e-3",
        "--set",
        "distill.checkpoint_every=2",
        "--set",
        "data.seq_len=32",
        "--set",
        "data.eval_sequences=4",
        "--set",
        "distill.threads=1",
    ]


def _run(cmd: list[str]) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def _weights(d: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


def test_two_processes_equal_one_process_with_double_accumulation(tiny_dir_6, tmp_path):
    teacher = load_model(str(tiny_dir_6))
    sdir = tmp_path / "init"
    build_student(teacher, sdir, 3, torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(0)))

    # --device cpu spelled out here; the launched processes below take the default (auto: the CPU here)
    one = json.loads(_run([sys.executable] + _args(tiny_dir_6, sdir, tmp_path / "one", accum=2) + ["--device", "cpu"]))
    # --multi_gpu is accelerate's torchrun launcher; without CUDA the processes use gloo (accelerate's
    # --cpu with several processes wants MPI instead)
    out = _run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(_free_port()),
        ]
        + _args(tiny_dir_6, sdir, tmp_path / "two", accum=1)
    )
    two = json.loads(out[out.index("{") :])  # one JSON result: process 1 prints nothing

    assert out.count('"steps"') == 1
    assert two["tokens"] == one["tokens"]  # both processes' tokens counted
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    moved = max((a[k] - _weights(sdir)[k]).abs().max().item() for k in a)
    assert moved > 1e-3  # training changed the weights, so equality below means something
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    assert abs(two["after"]["kl"] - one["after"]["kl"]) < 1e-4
    ckpt = torch.load(tmp_path / "two.work" / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == STEPS and len(ckpt["rng_ranks"]) == 2
