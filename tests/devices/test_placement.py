"""Where distillation runs (toolchain/devices/placement.py).

These run on the CPU machine CI has: they check the device choice, its errors, and that a run
hands the student back where it was. A run on a real GPU is not part of the test suite (no GPU
here); the GPU path is the same code with `distill.device: cuda`.
"""

import pytest
import torch

from toolchain.config import from_dict
from toolchain.devices.placement import place, resolve_device
from toolchain.distill.batch import Batch
from toolchain.errors import UserError
from toolchain.models.load import load_teacher


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "CPU", "", "mps"])
def test_bad_device_spelling_is_refused_in_the_config(spec):
    with pytest.raises(UserError, match="distill.device must be auto, cpu, cuda or cuda:N"):
        from_dict({"distill": {"device": spec}})


def test_cpu_and_auto_resolve_to_the_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="torch sees no CUDA GPU.*set distill.device: cpu"):
        resolve_device("cuda")
    with pytest.raises(UserError, match="torch sees no CUDA GPU"):
        resolve_device("cuda:0")


def test_each_launcher_process_takes_its_local_rank_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device("auto") == torch.device("cuda", 2)
    assert resolve_device("cuda") == torch.device("cuda", 2)
    with pytest.raises(UserError, match="would put all 4 processes on one GPU"):
        resolve_device("cuda:1")
    monkeypatch.setenv("LOCAL_RANK", "5")
    with pytest.raises(UserError, match="GPU 5 asked for, but torch sees 4"):
        resolve_device("cuda")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_device("cuda:3") == torch.device("cuda", 3)


def test_batch_to_its_own_device_is_itself():
    b = Batch.from_blocks(torch.arange(18).view(2, 9))
    assert b.to(torch.device("cpu")) is b
    moved = b.to(torch.device("meta"))
    assert moved.input_ids.device.type == "meta" and moved.labels.device.type == "meta"
    assert moved.attention_mask is None and moved.teacher_topk_ids is None


def test_a_quantized_teacher_is_not_moved_after_loading(tiny_dir):
    t = load_teacher(str(tiny_dir), quantize="8bit")
    assert place(t.model, torch.device("cpu")) is t.model  # already there: nothing to do
    with pytest.raises(UserError, match="cannot be moved after loading.*load_teacher\\(device=...\\)"):
        place(t.model, torch.device("cuda", 0))
