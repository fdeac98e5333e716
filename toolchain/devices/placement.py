"""Where distillation runs: the CPU or a CUDA device, one device per process under a launcher.

`distill.device` is `auto` (CUDA when torch sees a GPU, else the CPU), `cpu`, `cuda` or
`cuda:N`. Under `accelerate launch` / `torchrun` each process takes the GPU of its LOCAL_RANK,
so `cuda` and `auto` mean "this process's GPU"; a fixed `cuda:N` would put every process on
the same card and is refused there.

Models are moved once, before training; batches are built on the CPU (data, caches, tokenised
pairs) and moved by the loop as they are used. A bitsandbytes-quantized teacher cannot be moved
after loading, so it is loaded onto the device directly (`load_teacher(device=...)`).
"""

from __future__ import annotations

import os

import torch

from toolchain.config import check_device_spec
from toolchain.errors import UserError


def resolve_device(spec: str = "auto") -> torch.device:
    """The torch device `spec` names for this process (see the module docstring)."""
    check_device_spec(spec, "distill.device")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if ":" in spec and world > 1:
        raise UserError(
            f"distill.device: {spec} would put all {world} processes on one GPU; use "
            "distill.device: cuda (each process takes the GPU of its LOCAL_RANK)"
        )
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(
            f"distill.device: {spec}, but torch sees no CUDA GPU (a CPU-only torch build, or no GPU "
            "visible to this process); set distill.device: cpu (or auto)"
        )
    index = int(spec.split(":")[1]) if ":" in spec else local_rank
    if index >= torch.cuda.device_count():
        raise UserError(
            f"distill.device: GPU {index} asked for, but torch sees {torch.cuda.device_count()} "
            "(check CUDA_VISIBLE_DEVICES and the launcher's --num_processes)"
        )
    return torch.device("cuda", index)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def _is_bnb_quantized(model) -> bool:
    base = getattr(model, "get_base_model", lambda: model)()  # a PEFT wrapper: ask its base
    return bool(getattr(base, "is_loaded_in_8bit", False) or getattr(base, "is_loaded_in_4bit", False))


def place(model, device: torch.device):
    """Move `model` to `device` (in place; returns it). None passes through."""
    if model is None or model_device(model) == device:
        return model
    if _is_bnb_quantized(model):
        raise UserError(
            f"the bitsandbytes-quantized teacher was loaded on {model_device(model)}, but distillation "
            f"runs on {device}; a quantized model cannot be moved after loading, so load it with "
            "load_teacher(device=...) on the same device as distill.device"
        )
    return model.to(device)
