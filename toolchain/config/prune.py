"""The prune section: width (and further depth) pruning of the student by measured importance."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from toolchain.config.checks import choice, non_negative, positive
from toolchain.errors import UserError

IMPORTANCE_RULES = ("activation", "taylor", "random")
SHAPE_KEYS = ("layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")

_SUFFIX = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}


def parse_params(value, full_params: int) -> int:
    """'40M', '1.2B', 40000000, or a fraction of the model's parameters (0.5)."""
    if not isinstance(value, bool) and isinstance(value, int | float) and value > 0:
        return int(value * full_params) if value <= 1 else int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMBG]?)\s*", str(value), re.IGNORECASE)
    if m is None or float(m.group(1)) <= 0:
        raise UserError(f"prune.params must be a count like 40M or a fraction like 0.5, got {value!r}")
    number, suffix = float(m.group(1)), m.group(2).upper()
    if not suffix and number <= 1:
        return int(number * full_params)
    return int(number * _SUFFIX.get(suffix, 1))


@dataclass
class PruneAgain:
    """A second cut, of the distilled student, healed by `steps` more distillation steps from
    the teacher (Minitron's prune -> distil -> prune -> distil). The goal is set as for the
    first cut; `params` as a fraction counts the distilled student's parameters."""

    layers: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    params: str | float | None = None
    target: str | None = None
    steps: int = 100


@dataclass
class PruneConfig:
    """Targets are a shape (any of SHAPE_KEYS; unset ones stay as they are), a parameter budget
    (`params`), or a target device's memory (`target`); a budget is met by a small search over
    candidate shapes, each scored by held-out KL to the unpruned model."""

    enabled: bool = False
    layers: int | None = None  # blocks to keep (angular rule), on top of student.keep_layers
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    params: str | float | None = None  # "40M", 40000000 or a fraction of the model's parameters (0.5)
    target: str | None = None  # a target profile: weights at `quant` + KV cache at its context must fit
    quant: str = "Q8_0"  # the GGUF type weights are counted at for `target`
    depth: bool = True  # a budget search may also drop blocks
    align: int = 32  # a budget search keeps widths multiples of this (llama.cpp's Q8_0/Q4_0 block)
    importance: str = "activation"  # activation | taylor | random (the baseline)
    rescale_norms: bool = True  # keep the norms' outputs at their scale when hidden channels go
    rounds: int = 1  # prune in this many steps toward the shape, healing between them
    heal_steps: int = 20  # distillation steps after each round but the last (distill heals the last)
    search_steps: int = 0  # distillation steps per budget candidate before scoring (0: scored as pruned)
    calib_sequences: int = 8  # calibration sequences of data.seq_len tokens (a quarter score candidates)
    seed: int = 0
    again: PruneAgain | None = None  # cut the distilled student again (after the distill stage)

    def second_cut(self) -> PruneConfig | None:
        """The settings of the cut after distillation (`again`), or None."""
        if self.again is None:
            return None
        goal = {k: getattr(self.again, k) for k in (*SHAPE_KEYS, "params", "target")}
        return replace(self, enabled=True, rounds=1, again=None, **goal)

    def shape_fields(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in SHAPE_KEYS if getattr(self, k) is not None}

    def validate(self, where: str) -> None:
        second = self.second_cut()
        if second is not None and self.again is not None:
            positive(f"{where}.again.steps", self.again.steps)
            if second.params is None and second.target is None and not second.shape_fields():
                raise UserError(
                    f"{where}.again needs a goal: a shape (e.g. {where}.again.hidden_size=384), "
                    f"{where}.again.params (e.g. 0.7 of the distilled student) or {where}.again.target"
                )
            second.validate(f"{where}.again")
        choice(f"{where}.importance", self.importance, IMPORTANCE_RULES)
        for k, v in self.shape_fields().items():
            positive(f"{where}.{k}", v)
        positive(f"{where}.rounds", self.rounds)
        positive(f"{where}.align", self.align)
        positive(f"{where}.calib_sequences", self.calib_sequences)
        non_negative(f"{where}.heal_steps", self.heal_steps)
        non_negative(f"{where}.search_steps", self.search_steps)
        if self.params is not None and self.target is not None:
            raise UserError(f"{where}: set params or target, not both")
        if (self.params is not None or self.target is not None) and self.shape_fields():
            drop = ", ".join(self.shape_fields())
            raise UserError(f"{where}: a budget (params/target) chooses the shape; drop {drop}")
        if self.enabled and self.params is None and self.target is None and not self.shape_fields():
            raise UserError(
                f"{where}.enabled needs a goal: a shape (e.g. {where}.hidden_size=384), {where}.params "
                f"(e.g. 40M or 0.5) or {where}.target (a target profile)"
            )
        if self.params is not None:
            parse_params(self.params, 1)
        if self.target is not None:
            from toolchain.targets import load_target

            load_target(self.target)  # a missing or bad profile fails here, before any stage runs
            from toolchain.formats import SUPPORTED_TYPES

            choice(f"{where}.quant", self.quant, SUPPORTED_TYPES)
        heads, kv = self.num_attention_heads, self.num_key_value_heads
        if heads is not None and kv is not None and heads % kv:
            raise UserError(
                f"{where}.num_attention_heads={heads} is not a multiple of {where}.num_key_value_heads={kv} "
                "(each KV head serves the same number of query heads)"
            )
