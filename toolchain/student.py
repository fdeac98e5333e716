"""Make a student: a depth-pruned copy of the teacher.

Which blocks to keep is measured, not guessed: we run calibration text through the teacher and
drop, one at a time, the block whose output is most similar to its input (smallest angular
distance, as in ShortGPT's "block influence"), re-measuring on the pruned model after each
drop because removing one block changes what the others see. The first and last blocks are
always kept: they map to and from the embedding space and removing them hurts most.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from pathlib import Path

import torch

from toolchain.errors import UserError
from toolchain.models.load import LoadedModel, count_params, save_model
from toolchain.models.registry import get_arch

log = logging.getLogger(__name__)


def _per_layer_config_lists(config) -> list[str]:
    """Config attributes holding one entry per layer (e.g. gemma's layer_types)."""
    n = config.num_hidden_layers
    return [k for k, v in vars(config).items() if isinstance(v, list) and len(v) == n]


def with_layers(model, keep: list[int]):
    """A deep copy of `model` holding only the decoder blocks in `keep` (in order)."""
    arch = get_arch(model.config.model_type)
    student = copy.deepcopy(model)
    layers = arch.decoder_layers(student)
    new_layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(new_layers):
        # attention modules index the KV cache by their layer number
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                # torch types module attributes as Tensor | Module; HF attention keeps layer_idx as an int
                module.layer_idx = new_idx  # type: ignore[assignment]
    arch.set_decoder_layers(student, new_layers)
    for key in _per_layer_config_lists(student.config):
        setattr(student.config, key, [getattr(student.config, key)[i] for i in keep])
    student.config.num_hidden_layers = len(keep)
    return student


@contextlib.contextmanager
def _only_layers(model, keep: list[int]):
    """Temporarily run `model` with only the blocks in `keep` (no copy; for measuring)."""
    arch = get_arch(model.config.model_type)
    full, n = arch.decoder_layers(model), model.config.num_hidden_layers
    arch.set_decoder_layers(model, torch.nn.ModuleList([full[i] for i in keep]))
    model.config.num_hidden_layers = len(keep)
    try:
        yield model
    finally:
        arch.set_decoder_layers(model, full)
        model.config.num_hidden_layers = n


@torch.no_grad()
def _angular_distances(model, calib: torch.Tensor) -> list[float]:
    """Per block: mean angular distance (0..1) between its input and output hidden states.

    hidden_states holds the embeddings, then each block's output, the last one after the
    final norm; the last block is never a candidate, so its (normed) entry is not compared.
    The decoder body is run without the LM head: its logits are not needed, and with a 262k
    vocabulary (Gemma 3) they cost more than all the blocks.
    """
    hs = model.get_decoder()(calib, output_hidden_states=True, use_cache=False).hidden_states
    n = len(hs) - 1
    dists = []
    for i in range(n - 1):
        cos = torch.nn.functional.cosine_similarity(hs[i].float(), hs[i + 1].float(), dim=-1).clamp(-1, 1)
        dists.append(float(torch.arccos(cos).mean() / torch.pi))
    return dists + [float("inf")]


def choose_layers(model, calib: torch.Tensor, n_keep: int, rule: str = "angular") -> list[int]:
    n = model.config.num_hidden_layers
    if n_keep > n:
        raise UserError(f"student.keep_layers={n_keep} but the teacher has only {n} layers")
    if rule == "stride":
        return sorted({round(i * (n - 1) / max(n_keep - 1, 1)) for i in range(n_keep)})
    keep = list(range(n))
    while len(keep) > n_keep:
        with _only_layers(model, keep) as pruned:
            dists = _angular_distances(pruned, calib)
        # candidates: every kept block but the first and the last
        pos = min(range(1, len(keep) - 1), key=lambda j: dists[j])
        log.debug("dropping block %d (angular distance %.4f)", keep[pos], dists[pos])
        del keep[pos]
    return keep


def make_student(teacher: LoadedModel, keep_layers: int | list[int], calib: torch.Tensor, rule: str = "angular"):
    """Return (student model, kept layer indices)."""
    n = teacher.model.config.num_hidden_layers
    if isinstance(keep_layers, list):
        bad = [i for i in keep_layers if not 0 <= i < n]
        if bad:
            raise UserError(f"student.keep_layers lists layers {bad} but the teacher has layers 0..{n - 1}")
        keep = sorted(keep_layers)
    elif keep_layers == n:
        keep = list(range(n))
    elif keep_layers < 2 and rule == "angular":
        raise UserError("student.keep_layers must be >= 2 with the angular rule (first and last blocks are kept)")
    else:
        keep = choose_layers(teacher.model, calib, keep_layers, rule)
    student = with_layers(teacher.model, keep)
    return student, keep


def task_calibration(tokenizer, examples, seq_len: int, n: int) -> torch.Tensor:
    """Calibration blocks from task examples: their rendered chats packed into n rows of seq_len
    tokens, so the layers kept are the ones the task's inputs use (fewer rows when short of text)."""
    from toolchain.data.chat_encoding import encode_example

    stream: list[int] = []
    for e in examples:
        stream += encode_example(tokenizer, e.messages)[0]
        if len(stream) >= n * seq_len:
            break
    rows = max(1, min(n, len(stream) // seq_len))
    if len(stream) < seq_len:
        raise UserError(f"the task's calibration examples hold {len(stream)} tokens; student selection needs {seq_len}")
    return torch.tensor(stream[: rows * seq_len]).view(rows, seq_len)


def calibration_rows(tokenizer, data, task, n: int) -> torch.Tensor:
    """n calibration rows of data.seq_len tokens: the task's own inputs when there is a task (the
    structures kept are the ones it uses), else the first training blocks of the text."""
    if task is not None and task.path:
        return task_calibration(tokenizer, task.splits().calib, data.seq_len, n)
    from toolchain.data.corpus import train_and_heldout

    train, _ = train_and_heldout(
        tokenizer, data.source, data.seq_len, data.heldout_fraction, data.seed, data.eval_sequences, max_train_blocks=n
    )
    return train


def build_student(
    teacher: LoadedModel,
    out_dir: str | os.PathLike,
    keep_layers: int | list[int],
    calib: torch.Tensor,
    rule: str = "angular",
) -> dict:
    """Make and save the student as an HF safetensors directory; returns a summary."""
    student, keep = make_student(teacher, keep_layers, calib, rule)
    meta = {
        **{k: v for k, v in teacher.meta.items() if k in ("license", "tokenizer_pre")},
        "name": f"{teacher.meta.get('name', 'model')}-student-{len(keep)}L",
        "distilled_from": teacher.meta.get("source") or teacher.meta.get("name"),
        "teacher_sha256": teacher.meta.get("sha256"),
        "teacher_license": teacher.meta.get("license"),
        "kept_layers": keep,
    }
    save_model(student, teacher.tokenizer, out_dir, meta)
    return {"kept_layers": keep, "params": count_params(student), "path": str(Path(out_dir))}
