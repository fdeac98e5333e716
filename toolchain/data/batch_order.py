"""The order in which training blocks are visited: a pure function of (step, seed).

Every consumer (the loop's packed batches, the teacher cache, the sequence-level batches, the
TRL comparison benchmark) asks this one function, so a run resumed at step s sees the same data
as an uninterrupted one, and a cache built ahead of training holds exactly the blocks it uses.
"""

from __future__ import annotations

import torch


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Blocks for `step`: a fresh seeded permutation per epoch, so the order is reproducible."""
    out = []
    pos = step * batch_size
    for k in range(batch_size):
        epoch, i = divmod(pos + k, n)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        out.append(int(torch.randperm(n, generator=g)[i]))
    return torch.tensor(out)
