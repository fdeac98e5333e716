"""The prune stage: cut a student directory to a shape or a budget, in rounds, and save it.

Healing is the caller's: `heal(model_dir, out_dir, steps)` distills a saved model from the
teacher (the pipeline and the CLI pass one built on the distill stage), so this stage never
depends on the one after it. Between rounds the pruned model is healed for `heal_steps`; the
last round is left to the distill stage. For a budget, each candidate shape is scored by the
held-out KL between the unpruned model and the candidate (healed for `search_steps` first
when that is set), and every candidate's figures go into the record.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from toolchain.config.prune import PruneConfig, parse_params
from toolchain.errors import UserError
from toolchain.models.load import LoadedModel, count_params, load_model, save_model
from toolchain.prune.axes import Shape, params_of
from toolchain.prune.budget import candidate_shapes, memory_bytes
from toolchain.prune.cut import prune_model

log = logging.getLogger(__name__)

Heal = Callable[[Path, Path, int], None]


@torch.no_grad()
def heldout_kl(reference, model, blocks: torch.Tensor) -> float:
    """Mean per-token KL(reference || model) over `blocks`, one row at a time (vocabularies
    of 262k make a whole batch's logits large)."""
    total, n = 0.0, 0
    for row in blocks:
        x = row[None]
        p = torch.log_softmax(reference(x, use_cache=False).logits.float(), -1)
        q = torch.log_softmax(model(x, use_cache=False).logits.float(), -1)
        total += float((p.exp() * (p - q)).sum(-1).sum())
        n += x.numel()
    return total / max(n, 1)


def _goal_shape(cfg: PruneConfig, full: Shape) -> Shape | None:
    """The shape asked for directly (unset fields stay as they are), or None for a budget."""
    if cfg.params is not None or cfg.target is not None:
        return None
    return replace(full, **cfg.shape_fields())


def _fits(cfg: PruneConfig, config) -> tuple[Callable[[Shape], bool], str]:
    """The budget test for a shape, and the budget in words."""
    if cfg.params is not None:
        limit = parse_params(cfg.params, params_of(config, Shape.of(config)))
        return (lambda s: params_of(config, s) <= limit), f"{limit / 1e6:.1f} M params"
    from toolchain.targets import load_target

    t = load_target(cfg.target)  # type: ignore[arg-type]
    limit = t.memory_budget_mb * 2**20
    return (
        lambda s: memory_bytes(config, s, cfg.quant, t.context) <= limit
    ), f"{t.memory_budget_mb} MB on {t.name} ({cfg.quant} weights + KV cache at {t.context} tokens)"


def _search(student: LoadedModel, calib, score_rows, cfg: PruneConfig, work: Path, heal: Heal | None) -> tuple:
    """(best shape, candidate records) for a budget."""
    config = student.model.config
    fits, words = _fits(cfg, config)
    from toolchain.models.registry import get_arch

    shapes = candidate_shapes(config, fits, cfg.depth, cfg.align, get_arch(config.model_type).width_is_heads)
    if not shapes:
        smallest = replace(Shape.of(config), layers=2 if cfg.depth else config.num_hidden_layers)
        smallest = replace(smallest, hidden_size=cfg.align, intermediate_size=cfg.align)
        raise UserError(
            f"prune: no candidate shape fits {words}; the smallest tried has {params_of(config, smallest) / 1e6:.1f} M "
            "params: raise the budget (or lower prune.align)"
        )
    records: list[dict] = []
    kls: list[float] = []
    cache: dict = {}
    for i, shape in enumerate(shapes):
        model, _ = prune_model(student.model, calib, shape, cfg.importance, cfg.seed, cfg.rescale_norms, cache)
        if heal is not None and cfg.search_steps:
            save_model(model, student.tokenizer, work / f"candidate-{i}", dict(student.meta))
            heal(work / f"candidate-{i}", work / f"candidate-{i}-healed", cfg.search_steps)
            model = load_model(str(work / f"candidate-{i}-healed")).model
        kl, params = heldout_kl(student.model, model, score_rows), count_params(model)
        kls.append(kl)
        records.append({"shape": vars(shape), "params": params, "kl": round(kl, 5)})
        log.info("prune candidate %s: %.1f M params, held-out KL %.4f", vars(shape), params / 1e6, kl)
    best = min(range(len(shapes)), key=lambda i: kls[i])
    return shapes[best], records, words


def _round_shapes(full: Shape, goal: Shape, rounds: int) -> list[Shape]:
    """Shapes after each round, each dimension shrinking geometrically; heads stay in whole KV
    groups, and an intermediate width is a multiple of lcm(heads, 8)."""

    def at(a: int, b: int, k: int, multiple: int = 1) -> int:
        return max(b, round(a * (b / a) ** (k / rounds)) // multiple * multiple)

    out = []
    for k in range(1, rounds + 1):
        kv = at(full.num_key_value_heads, goal.num_key_value_heads, k)
        per_group = at(
            full.num_attention_heads // full.num_key_value_heads,
            goal.num_attention_heads // goal.num_key_value_heads,
            k,
        )
        out.append(
            Shape(
                at(full.layers, goal.layers, k),
                at(full.hidden_size, goal.hidden_size, k, math.lcm(kv * per_group, 8)),
                at(full.intermediate_size, goal.intermediate_size, k, 8),
                kv * per_group,
                kv,
            )
        )
    out[-1] = goal
    return out


def _compose_layers(meta: dict, kept: list[int]) -> list[int] | None:
    """Teacher block indices of the pruned model's blocks, when the input recorded its own."""
    before = meta.get("kept_layers")
    return [before[i] for i in kept] if before and len(before) > max(kept) else None


def prune_student(
    student_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: PruneConfig,
    calib: torch.Tensor,
    work_dir: str | os.PathLike,
    heal: Heal | None = None,
) -> dict:
    """Prune the model in student_dir as `cfg` says and save it to out_dir; returns the record."""
    student = load_model(str(student_dir))
    work = Path(work_dir)
    score_rows = calib[-max(1, len(calib) // 4) :] if len(calib) > 1 else calib
    calib = calib[: len(calib) - len(score_rows)] if len(calib) > 1 else calib
    full = Shape.of(student.model.config)
    record: dict = {"params_before": count_params(student.model), "importance": cfg.importance}
    goal = _goal_shape(cfg, full)
    if goal is None:
        goal, record["candidates"], record["budget"] = _search(student, calib, score_rows, cfg, work, heal)
    goal.check_within(full)
    needed = rounds_needed(params_of(student.model.config, goal) / record["params_before"])
    if cfg.rounds < needed:
        log.warning(
            "prune: %d round(s) cut more than 1/3 of the parameters at once; prune.rounds=%d heals in between",
            cfg.rounds,
            needed,
        )
    shapes = _round_shapes(full, goal, cfg.rounds)
    meta, model, kept = dict(student.meta), student.model, list(range(full.layers))
    record["rounds"] = []
    for k, shape in enumerate(shapes):
        pruned, r = prune_model(model, calib, shape, cfg.importance, cfg.seed + k, cfg.rescale_norms)
        kept = [kept[i] for i in r["kept_layers"]]
        entry = {"shape": vars(shape), "params": count_params(pruned), "kept_importance": r.get("kept_importance")}
        if r.get("rescale"):
            entry["rescale"] = r["rescale"]
        if k < len(shapes) - 1 and heal is not None and cfg.heal_steps:
            save_model(pruned, student.tokenizer, work / f"round-{k + 1}", {**meta, "kept_layers": None})
            heal(work / f"round-{k + 1}", work / f"round-{k + 1}-healed", cfg.heal_steps)
            pruned = load_model(str(work / f"round-{k + 1}-healed")).model
            entry["healed_steps"] = cfg.heal_steps
        record["rounds"].append(entry)
        model = pruned
    record.update(
        shape_before=vars(full),
        shape=vars(goal),
        params=count_params(model),
        heldout_kl=round(heldout_kl(student.model, model, score_rows), 5),
    )
    record["params_ratio"] = round(record["params"] / record["params_before"], 4)
    meta["kept_layers"] = _compose_layers(student.meta, kept) or kept
    if "pruning" in student.meta:  # cut again (after distillation): keep how it was cut before
        meta["pruned_before"] = student.meta["pruning"]
    meta["pruning"] = record
    meta["name"] = f"{student.meta.get('name', 'model')}-pruned-{record['params'] / 1e6:.0f}M"
    save_model(model, student.tokenizer, out_dir, meta)
    return {**record, "kept_layers": meta["kept_layers"], "path": str(Path(out_dir))}


def rounds_needed(params_ratio: float) -> int:
    """Rounds that keep each one's cut at <= 1/3 of the parameters (the usual healing rule)."""
    return max(1, math.ceil(math.log(params_ratio) / math.log(2 / 3) - 1e-9))
