"""Hidden-state loss: pull chosen student layers' outputs towards the teacher layers they came
from (the student's toolchain.json records `kept_layers`: student block i is teacher block
kept_layers[i]). When widths differ, a learned linear projection maps student width to teacher
width; it is trained with the student and saved in the checkpoint, never in the student.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F

from toolchain.errors import UserError


class HiddenMatcher(torch.nn.Module):
    def __init__(self, layer_map: list[tuple[int, int]], student_width: int, teacher_width: int, kind: str):
        super().__init__()
        if not layer_map:
            raise UserError(
                "distill.hidden_loss needs a student made from the teacher (its toolchain.json "
                "lists kept_layers); set distill.hidden_loss=none for this student"
            )
        self.layer_map, self.kind = list(layer_map), kind
        same = student_width == teacher_width
        self.proj = torch.nn.ModuleList(
            torch.nn.Identity() if same else torch.nn.Linear(student_width, teacher_width, bias=False)
            for _ in self.layer_map
        )

    def forward(self, s_states, t_states, mask: torch.Tensor, denom: float) -> torch.Tensor:
        """Sum over loss tokens of the mean per-layer distance, divided by `denom`.

        s_states / t_states: HF `hidden_states` tuples (index 0 = embeddings, j + 1 = block j's output).
        """
        w = mask.reshape(-1).float()
        total: torch.Tensor | float = 0.0  # a tensor from the first layer on
        for (si, ti), proj in zip(self.layer_map, self.proj):
            s = proj(s_states[si + 1].reshape(len(w), -1).float())
            t = t_states[ti + 1].reshape(len(w), -1).float()
            if self.kind == "mse":
                d = (s - t).pow(2).mean(-1)
            else:  # cosine
                d = 1.0 - F.cosine_similarity(s, t, dim=-1)
            total = total + (d * w).sum()
        # layer_map is never empty (the division would fail), so the sum is a tensor
        return cast(torch.Tensor, total / (len(self.layer_map) * max(1.0, denom)))


def layer_map_from_meta(meta: dict, n_student_layers: int) -> list[tuple[int, int]]:
    kept = meta.get("kept_layers") or []
    if len(kept) != n_student_layers:
        return []
    return list(enumerate(kept))
