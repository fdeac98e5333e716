"""Data-parallel distillation over several processes (`accelerate launch`, `torchrun`).

The launcher sets WORLD_SIZE / RANK / LOCAL_RANK / MASTER_ADDR; with WORLD_SIZE > 1 every process
holds the whole student and teacher and trains on its share of each step's micro-batches:
process r takes global micro-batches r, r + W, r + 2W, ... of the step. After backward the
gradients are summed across processes, and every process divides by the step's loss tokens
summed over all of them, so one step of W processes x grad_accum k computes exactly the update
of one process with grad_accum W*k (up to float summation order) - the same data, the same
token-weighted mean. This is DDP's all-reduce without its module wrapper: the fused head runs
the student's body and head separately, which DDP's forward hooks do not see.

Process 0 writes checkpoints and outputs; the others wait for it at barriers. Backend: gloo for
CPU tensors (CPU processes, used by the tests; the small step counters and objects), and NCCL
for CUDA tensors (the gradients of a GPU run) where CUDA is available.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# gradients are reduced in flat buckets of this many elements (~100 MB of fp32): fewer calls
BUCKET = 25_000_000


@dataclass(frozen=True)
class Parallel:
    world: int = 1
    rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


SINGLE = Parallel()


def from_env() -> Parallel:
    """The process group the launcher describes (initialised once), or SINGLE without one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if local < torch.cuda.device_count():
                torch.cuda.set_device(local)
            # each tensor goes over the backend of its device: CPU counters and objects over
            # gloo, a GPU run's gradients over NCCL
            dist.init_process_group("cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group("gloo")
    return Parallel(dist.get_world_size(), dist.get_rank())


def micro_batch_index(par: Parallel, step: int, accum: int, k: int) -> int:
    """Global index of this process's k-th micro-batch of `step` (see the module docstring)."""
    return (step * accum + k) * par.world + par.rank


def all_sum(par: Parallel, value: float) -> float:
    if not par.active:
        return value
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


def sum_gradients(par: Parallel, params: list[torch.nn.Parameter]) -> None:
    """Sum every parameter's gradient across processes, in flat buckets."""
    if not par.active:
        return
    import torch.distributed as dist

    # every process must reduce the same list: a parameter that has a gradient on some process
    # but not here (unused by this process's batches) gets zeros; one unused everywhere keeps None,
    # so the optimizer skips it exactly as a single process would
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    params = [p for p, h in zip(params, has.tolist()) if h]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buckets: list[list[torch.Tensor]] = [[]]
    size = 0
    for p in params:
        grad = p.grad
        assert grad is not None  # every parameter left in `params` was given one above
        if buckets[-1] and size + grad.numel() > BUCKET:
            buckets.append([])
            size = 0
        buckets[-1].append(grad)
        size += grad.numel()
    for bucket in filter(None, buckets):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def broadcast_parameters(par: Parallel, module: torch.nn.Module) -> None:
    """Every process starts from process 0's weights (a student built or resumed there)."""
    if not par.active:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, 0)


def barrier(par: Parallel) -> None:
    if par.active:
        import torch.distributed as dist

        dist.barrier()


def gather(par: Parallel, obj) -> list:
    """Every process's `obj` (process order), on every process."""
    if not par.active:
        return [obj]
    import torch.distributed as dist

    out = [None] * par.world
    dist.all_gather_object(out, obj)
    return out
