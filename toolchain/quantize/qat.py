"""Quantization-aware distillation: the student distils again while every weight matrix passes
through the exact rounding its exported file will store (quantize/fake_quant.py).

For a GGUF type, which matrix gets which rounding is decided as our GGUF writer decides it
(export/gguf.py: the file type's tensor type, the `export.gguf_overrides` pattern that matches
the tensor's GGUF name, F16 for rows that do not split into blocks; vectors stay F32), so the
trained weights are the file's weights. After training each weight is replaced by its quantized
value (fp32, on the grid): the GGUF writer then reproduces the codes bit for bit.

Q4_K_M takes its per-tensor types from llama.cpp's own Q4_K_M of the student (Q4_K, Q6_K where
llama.cpp spends more bits, Q5_0/Q8_0 where a row does not split into 256), so the trained file
has llama.cpp's layout and size; its K-quant tensors are our rounding (quantize/kquants.py),
which our writer then stores. K grids are not idempotent (re-fitting a block's own values can
change its scales), so the student keeps its latent weights and the writer recomputes the codes.

With `learn_scales` (quantize.learn_scales) each Q4_0/Q8_0 block's scale trains too (LSQ's
gradient), starting from the reference rounding's or from llama.cpp's importance-weighted scale
search: any fp16 scale is a valid block, so the file holds the trained scales exactly. The
reference rounding of the trained values would not give those scales back, so the student keeps
its latent weights and its scales (SCALES_FILE) and the writer packs the trained codes.

For int4 (the ONNX int4 export) the decoder blocks' matrices train through the grid the export
measures as better for this student (quantize/onnx_grid.py): the int4 blocks' min/max grid (the
trainable twin of its fitted offsets) or its symmetric grid; the output projection and token
table, which that export stores in 8 bits, are not rounded. The student keeps its latent
weights (these grids are not idempotent in float) and records the grid, so the export
recomputes exactly the trained codes (export/onnx.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch.nn.utils import parametrize

from toolchain.errors import UserError
from toolchain.formats import (
    FAKE_QUANT_TYPES,
    PYTHON_TYPES,
    QAT_GGUF_TYPES,
    QAT_LATENT_TYPES,
    QAT_MIX_TYPES,
    QAT_TYPES,
    override_for,
)
from toolchain.quantize.fake_quant import (
    BLOCK,
    LEARNED_SCALE_CODES,
    fake_quantize,
    learned_scale_values,
    reference_scales,
)

if TYPE_CHECKING:
    from toolchain.config import DataConfig, DistillConfig, QuantizeConfig, TaskConfig, TeacherConfig


def check_qat(type_name: str, overrides: dict[str, str] | None, where: str = "quantize.qat") -> None:
    """A one-line error unless every tensor of `type_name` (with `overrides`) can be fake-quantized."""
    if type_name not in QAT_TYPES:
        raise UserError(f"{where}: '{type_name}' has no exact fake-quant; choose from {', '.join(QAT_TYPES)}")
    if type_name not in QAT_GGUF_TYPES:
        return  # int4: the ONNX export's fixed mix; GGUF overrides do not apply
    for pattern, t in (overrides or {}).items():
        if t not in FAKE_QUANT_TYPES:
            raise UserError(
                f"{where}: the GGUF override {pattern!r} -> {t} has no exact fake-quant "
                f"(quantization-aware tensors can be {', '.join(FAKE_QUANT_TYPES)})"
            )


SCALES_FILE = "qat/scales.safetensors"  # in a learned-scale student's directory, beside its weights


class _Rounding(torch.nn.Module):
    """A weight parametrization: the GGUF type's stored values, straight-through gradient."""

    def __init__(self, type_name: str):
        super().__init__()
        self.type_name = type_name

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize(w, self.type_name)


class _LearnedRounding(torch.nn.Module):
    """A weight parametrization whose block scales train with the weights (LSQ): Q4_0/Q8_0 codes
    rounded against the fp16 scale the file will hold, starting from the reference rounding's
    scales (or a trained student's, to train further).

    The parameter is each block's range, scale x the largest code magnitude (8 for Q4_0, 128 for
    Q8_0): a step of the optimizer then moves a block's extreme value as far as it moves a
    weight, so one learning rate suits both (a raw scale would move 8x or 128x faster)."""

    def __init__(self, type_name: str, weight: torch.Tensor, scale: torch.Tensor | None = None):
        super().__init__()
        self.type_name = type_name
        self.reach = float(-LEARNED_SCALE_CODES[type_name][0])
        start = reference_scales(weight, type_name) if scale is None else scale.detach().float()
        self.range = torch.nn.Parameter((start * self.reach).to(weight.device))

    @property
    def scale(self) -> torch.Tensor:
        return self.range / self.reach

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return learned_scale_values(w, self.scale, self.type_name)


def _gguf_names(model):
    import gguf

    from toolchain.models.registry import get_arch

    config = model.config.get_text_config()
    arch = get_arch(config.model_type)
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_arch], config.num_hidden_layers)


def tensor_types(
    model, type_name: str, overrides: dict[str, str] | None = None, gguf_types: dict[str, str] | None = None
) -> dict[str, str]:
    """{module name: GGUF tensor type} for each weight matrix, as export.gguf writes `type_name`;
    `gguf_types` ({GGUF tensor name: type}, llama.cpp's mix for a K-quant file) decides instead.

    A head tied to the token embedding is stored once, as token_embd: it takes that type."""
    check_qat(type_name, overrides)
    if type_name in QAT_MIX_TYPES and not gguf_types:
        raise ValueError(f"{type_name}: pass the file's per-tensor types (export.gguf.qat_tensor_types)")
    if type_name == "int4":
        from toolchain.quantize.onnx_grid import int4_types

        return int4_types(model)
    tmap = _gguf_names(model)
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    types, embed_name, head_name = {}, None, None
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            continue
        gguf_name = tmap.get_name(f"{name}.weight", try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"no GGUF name for {name}.weight of {model.config.model_type}: cannot match its rounding")
        if tied and module is head:
            t = ""  # stored once, as token_embd: takes its type below
        elif gguf_types:
            t = _mixed_type(gguf_types, gguf_name, type_name)
        else:
            t = override_for(gguf_name, overrides) or PYTHON_TYPES[type_name][0]
            if t not in ("F32", "F16") and module.weight.shape[-1] % BLOCK:
                t = "F16"  # as quantize_tensor does for rows that do not split into blocks
        types[name] = t
        embed_name = name if module is embed else embed_name
        head_name = name if module is head else head_name
    if tied and head_name is not None and embed_name is not None:
        types[head_name] = types[embed_name]
    return types


def _mixed_type(gguf_types: dict[str, str], gguf_name: str, type_name: str) -> str:
    t = gguf_types.get(gguf_name)
    if t is None:
        raise UserError(f"{type_name}: llama.cpp's mix names no type for {gguf_name}")
    if t not in FAKE_QUANT_TYPES:
        raise UserError(
            f"{type_name}: llama.cpp stores {gguf_name} as {t}, which has no exact training rounding "
            f"(quantization-aware tensors can be {', '.join(FAKE_QUANT_TYPES)}); override it"
        )
    return t


def round_through(model, types: dict[str, str], scales: dict[str, torch.Tensor] | None = None) -> None:
    """Register the rounding on every weight in `types` (a tied weight is rounded once per use,
    the same way, and its gradient still reaches the one shared tensor). With `scales` (None:
    the reference rounding) each Q4_0/Q8_0 weight learns its block scales, starting from
    `scales[weight name]` where given, else from the reference rounding's; a tied weight's
    uses share one scale tensor, as the file stores the matrix once."""
    modules = dict(model.named_modules())
    shared: dict[int, torch.nn.Module] = {}
    for name, t in types.items():
        if t == "F32":
            continue
        weight = modules[name].weight
        rounding: torch.nn.Module = _Rounding(t)
        if scales is not None and t in LEARNED_SCALE_CODES:
            if id(weight) not in shared:
                shared[id(weight)] = _LearnedRounding(t, weight, scales.get(f"{name}.weight"))
            rounding = shared[id(weight)]
        parametrize.register_parametrization(modules[name], "weight", rounding, unsafe=True)


def searched_scales(model, types: dict[str, str], importance: dict) -> dict[str, torch.Tensor]:
    """{weight name: block scales} where learned scales can start from llama.cpp's importance-
    weighted scale search (quantize/weighted.py) instead of the largest weight: each Q4_0 matrix
    that `importance` ({GGUF tensor name: per-column weights}) covers."""
    from toolchain.quantize.weighted import WEIGHTED_NMAX, weighted_codes

    tmap = _gguf_names(model)
    modules = dict(model.named_modules())
    out = {}
    for name, t in types.items():
        imp = importance.get(tmap.get_name(f"{name}.weight", try_suffixes=(".weight",)) or "")
        if t != "Q4_0" or imp is None:
            continue
        w = modules[name].weight.detach().float().cpu().numpy()
        scale, _ = weighted_codes(w, imp, WEIGHTED_NMAX[t])
        out[f"{name}.weight"] = torch.from_numpy(scale.reshape(w.shape[0], -1))
    return out


def learned_scales(model) -> dict[str, torch.Tensor]:
    """{weight name: its learned block scales} of a model rounded with learned scales, each
    tensor once (a tied head's are its embedding's, named by the first module that uses them)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module, "weight"):
            continue
        for rounding in module.parametrizations.weight:
            if isinstance(rounding, _LearnedRounding) and id(rounding) not in seen:
                seen.add(id(rounding))
                out[f"{name}.weight"] = rounding.scale.detach().float().cpu().clone()
    return out


def round_inputs(model, types: dict[str, str]) -> list:
    """Round the input of every matmul whose weight is block-quantized in `types` as llama.cpp's
    CPU matmul does (fake_quant.ACTIVATION_BLOCK), straight-through; returns the hook handles."""
    from toolchain.quantize.fake_quant import ACTIVATION_BLOCK, round_activations

    handles = []
    for name, module in model.named_modules():
        block = ACTIVATION_BLOCK.get(types.get(name, ""))
        if block and isinstance(module, torch.nn.Linear) and module.in_features % block == 0:
            handles.append(module.register_forward_pre_hook(lambda _m, args, b=block: (round_activations(args[0], b),)))
    return handles


def bake(model, keep_latent: bool = False) -> None:
    """Replace each rounded weight by its stored values (fp32), or with `keep_latent` by the
    weights it rounds; the model is plain again."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=not keep_latent)
    if getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()


@dataclass
class QuantAware:
    """The student transform distill_student applies: round while training, bake before saving."""

    type_name: str
    overrides: dict[str, str] = field(default_factory=dict)
    steps: int = 0
    int4_grid: str = "minmax"  # int4: the export's grid the blocks train through (minmax | symmetric)
    gguf_types: dict[str, str] = field(default_factory=dict)  # a K-quant file's per-tensor types
    activations: bool = True  # GGUF types: also round matmul inputs as llama.cpp's CPU matmul does
    learn_scales: bool = False  # Q4_0/Q8_0 block scales train with the weights (stored in SCALES_FILE)
    scales: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # start / trained scales
    importance: dict = field(default_factory=dict, repr=False)  # learned scales start from its search
    start: dict = field(default_factory=dict)  # how the learned scales' start was chosen (measured KLs)
    _hooks: list = field(default_factory=list, repr=False)

    @property
    def meta(self) -> dict:
        qat: dict = {"type": self.type_name, "overrides": dict(self.overrides), "steps": self.steps}
        if self.type_name == "int4":
            qat["grid"] = self.int4_grid
        if self.gguf_types:
            qat["tensors"] = dict(self.gguf_types)
        if self.type_name in QAT_GGUF_TYPES:
            qat["activations"] = self.activations
        if self.learn_scales:
            qat["scales"] = SCALES_FILE
        if self.start:
            qat["scale_start"] = dict(self.start)
        return {"qat": qat}

    @property
    def files(self) -> dict[str, dict[str, torch.Tensor]]:
        """Tensor files saved with the student: the learned scales, after `finish`."""
        return {SCALES_FILE: self.scales} if self.learn_scales else {}

    def apply(self, model) -> None:
        types = tensor_types(model, self.type_name, self.overrides, self.gguf_types)
        if self.int4_grid == "symmetric":
            types = {n: "int4_sym" if t == "int4" else t for n, t in types.items()}
        if self.learn_scales and self.importance:
            self.scales = {**searched_scales(model, types, self.importance), **self.scales}
        round_through(model, types, self.scales if self.learn_scales else None)
        if self.activations and self.type_name in QAT_GGUF_TYPES:
            self._hooks = round_inputs(model, types)

    def finish(self, model) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.learn_scales:
            self.scales = learned_scales(model)
        # a learned scale is not the reference rounding's: the writer needs the latent weights
        bake(model, keep_latent=self.type_name in QAT_LATENT_TYPES or self.learn_scales)


def load_scales(model_dir: str | os.PathLike, qat: dict | None) -> dict[str, torch.Tensor]:
    """A learned-scale student's block scales ({} for any other model); a one-line error when
    its record names a scale file that is not there."""
    from pathlib import Path

    from safetensors.torch import load_file

    name = (qat or {}).get("scales")
    if not name:
        return {}
    path = Path(model_dir) / name
    if not path.is_file():
        raise UserError(
            f"{model_dir}: its quantize.qat record names learned scales in {name}, which is missing; "
            "train it again (toolchain quantize)"
        )
    return load_file(path)


def trained_rounding(qat: dict, scales: dict[str, torch.Tensor] | None = None) -> QuantAware:
    """The rounding a student's quantize.qat record (and learned scales) says it trained through."""
    return QuantAware(
        qat["type"],
        qat.get("overrides") or {},
        gguf_types=qat.get("tensors") or {},
        learn_scales=bool(qat.get("scales")),
        scales=dict(scales or {}),
    )


def qad_distill_config(distill: DistillConfig, quantize: QuantizeConfig) -> DistillConfig:
    """The run's distillation settings with quantize's steps and lr, training the full weights
    (no LoRA: the rounding applies to the merged matrices)."""
    import dataclasses

    lora = dataclasses.replace(distill.lora, r=0)
    return dataclasses.replace(distill, steps=quantize.steps, lr=quantize.lr, lora=lora)


def qat_distill(
    teacher,
    student_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    data: DataConfig,
    cfg: DistillConfig,
    work_dir: str | os.PathLike,
    type_name: str,
    overrides: dict[str, str] | None = None,
    progress: bool = True,
    teacher_cfg: TeacherConfig | None = None,
    task: TaskConfig | None = None,
    gguf_types: dict[str, str] | None = None,
    round_activations: bool = True,
    learn_scales: bool = False,
    scale_start: str = "measured",
) -> dict:
    """Distil `student_dir` from the teacher through `type_name`'s rounding; the saved student's
    weights are the values its `type_name` GGUF stores, or for Q4_K_M and int4 the weights the
    export computes those values from (see the module docstring). `gguf_types`: Q4_K_M's
    per-tensor types for this student (export.gguf.qat_tensor_types). `learn_scales`: Q4_0/Q8_0
    block scales train too, starting from the student's own learned ones if it was trained so
    before, else (`scale_start`) from the importance-weighted search on 32 calibration rows
    ("imatrix"), from the reference rounding ("reference"), or from whichever of the two the
    student, so rounded, is closer to itself on 4 more rows ("measured": the importance matrix
    does not help every model, see export.gguf's judge)."""
    from toolchain.distill.run import distill_student
    from toolchain.models.load import read_meta

    check_qat(type_name, overrides)
    if cfg.lora.r:
        raise UserError("quantization-aware distillation trains the full weights: set distill.lora.r to 0")
    grid = _measured_int4_grid(student_dir, data, task) if type_name == "int4" else "minmax"
    learn_scales = learn_scales and type_name in QAT_GGUF_TYPES  # int4's grids have no stored block scale
    before = read_meta(student_dir).get("qat") or {}
    scales = load_scales(student_dir, before) if learn_scales and before.get("type") == type_name else {}
    rounding = QuantAware(type_name, dict(overrides or {}), cfg.steps, grid, dict(gguf_types or {}))
    rounding.activations, rounding.learn_scales, rounding.scales = round_activations, learn_scales, scales
    # the search is Q4_0's (Q8_0 blocks start at their reference scale)
    if learn_scales and not scales and scale_start != "reference" and type_name == "Q4_0":
        _choose_start(rounding, student_dir, data, task, measure=scale_start == "measured")
    res = distill_student(
        teacher,
        student_dir,
        out_dir,
        data,
        cfg,
        work_dir,
        progress=progress,
        teacher_cfg=teacher_cfg,
        task=task,
        transform=rounding,
    )
    return {**res, "learn_scales": rounding.learn_scales, "scale_start": rounding.start or None}


def _choose_start(rounding: QuantAware, student_dir, data: DataConfig, task: TaskConfig | None, measure: bool) -> None:
    """Give `rounding` the student's importance matrix (32 calibration rows, the task's inputs in
    a task run) to start its scales from; with `measure`, only if the student rounded from that
    start is closer to itself (KL on 4 more rows) than rounded from the reference start."""
    import copy

    from toolchain.models.load import load_model
    from toolchain.quantize.imatrix import collect
    from toolchain.student import calibration_rows

    student = load_model(str(student_dir))
    rows = calibration_rows(student.tokenizer, data, task, 32 + (4 if measure else 0))
    importance = collect(student_dir, rows[:32])
    if not measure:
        rounding.importance = importance
        return
    held = rows[32:]
    with torch.no_grad():
        ref = torch.log_softmax(student.model(held, use_cache=False).logits.float(), -1)
        kl = {}
        for start, imp in (("reference", {}), ("imatrix", importance)):
            trial = copy.deepcopy(rounding)
            trial.importance = imp
            model = copy.deepcopy(student.model)
            trial.apply(model)
            q = torch.log_softmax(model(held, use_cache=False).logits.float(), -1)
            kl[start] = round(float((ref.exp() * (ref - q)).sum(-1).mean()), 5)
    chosen = "imatrix" if kl["imatrix"] <= kl["reference"] else "reference"
    rounding.importance = importance if chosen == "imatrix" else {}
    rounding.start = {"chosen": chosen, "kl": kl, "tokens": int(held.numel())}


def _measured_int4_grid(student_dir, data: DataConfig, task: TaskConfig | None) -> str:
    """The int4 grid the export would choose for this student (quantize/onnx_grid.py): the blocks
    train through that one (minmax, the fit's trainable twin, or symmetric)."""
    import dataclasses

    from toolchain.models.load import load_model
    from toolchain.quantize.onnx_grid import choose_int4_grid
    from toolchain.student import calibration_rows

    student = load_model(str(student_dir))
    rows = calibration_rows(student.tokenizer, dataclasses.replace(data, seq_len=128), task, 4)
    return "symmetric" if choose_int4_grid(student.model, rows)["grid"] == "symmetric" else "minmax"
