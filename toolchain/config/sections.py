"""The configuration's sections: one dataclass per pipeline section, defaults included.

Unknown keys and wrong types are refused with a message naming the key, what was expected and
the valid keys, so a typo never silently falls back to a default. Range checks live in each
section's `validate()`, next to the values they guard.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, cast

from toolchain.config.checks import choice as _choice
from toolchain.config.checks import existing_file as _existing_file
from toolchain.config.checks import non_negative as _non_negative
from toolchain.config.checks import positive as _positive
from toolchain.config.pack import PackConfig
from toolchain.config.prune import PruneConfig
from toolchain.config.quantize import QuantizeConfig
from toolchain.config.task import FinetuneConfig, LoraConfig, TaskConfig
from toolchain.errors import UserError

DEFAULT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nWhat is a list comprehension in Python?<|im_end|>\n<|im_start|>assistant\n",
    "The for statement is used to iterate over the elements of a sequence",
]

DISTILL_LOSSES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")


@dataclass
class TeacherConfig:
    model: str = "smollm2-135m-instruct"  # bundled name, HF directory or .gguf file
    adapter: str | None = None  # PEFT/LoRA adapter directory, merged into the teacher
    dtype: str = "float32"
    quantize: str = "none"  # none | 8bit | 4bit (bitsandbytes; works on CPU)
    adapter_mode: str = "merge"  # merge the adapter into the weights, or attach it (needed with quantize)

    def validate(self, where: str) -> None:
        from toolchain.models.load import ADAPTER_MODES, DTYPES, QUANTIZE_MODES

        _choice(f"{where}.dtype", self.dtype, DTYPES)
        _choice(f"{where}.quantize", self.quantize, QUANTIZE_MODES)
        _choice(f"{where}.adapter_mode", self.adapter_mode, ADAPTER_MODES)
        if self.adapter and self.quantize != "none" and self.adapter_mode == "merge":
            raise UserError(
                f"{where}.adapter_mode: merge would round the adapter away in a {self.quantize} teacher; use attach"
            )
        if self.adapter and not (Path(self.adapter).expanduser() / "adapter_config.json").is_file():
            raise UserError(f"{where}.adapter: {self.adapter} is not a PEFT adapter directory (no adapter_config.json)")


@dataclass
class StudentConfig:
    keep_layers: int | list[int] = 10  # how many blocks to keep, or their indices
    selection: str = "angular"  # "angular": drop blocks that change their input least; "stride"
    calib_sequences: int = 8  # calibration sequences (of data.seq_len tokens) for the rule

    def validate(self, where: str) -> None:
        _choice(f"{where}.selection", self.selection, ("angular", "stride"))
        if isinstance(self.keep_layers, int) and self.keep_layers < 1:
            raise UserError(f"{where}.keep_layers must be >= 1, got {self.keep_layers}")
        if isinstance(self.keep_layers, list) and any(i < 0 for i in self.keep_layers):
            raise UserError(f"{where}.keep_layers: layer indices start at 0, got {self.keep_layers}")
        if isinstance(self.keep_layers, list) and len(set(self.keep_layers)) != len(self.keep_layers):
            raise UserError(f"{where}.keep_layers lists a layer twice: {self.keep_layers}")
        _positive(f"{where}.calib_sequences", self.calib_sequences)


@dataclass
class DataConfig:
    source: str = "pydoc"  # stdlib pydoc_data.topics, or a path to a .txt file
    seq_len: int = 128
    heldout_fraction: float = 0.1  # fraction of topics (documents) held out for evaluation
    eval_sequences: int = 16
    seed: int = 0
    # where the teacher signal comes from (toolchain/distill/modes.py):
    #   text: packed text, teacher run online; cache: teacher top-k stored once, then not loaded;
    #   sequences: black-box KD on prompt/response pairs (a JSONL, or teacher generations of `prompts`)
    mode: str = "text"
    cache_dir: str | None = None  # cache mode: where the teacher cache lives (default: in the run's work dir)
    cache_k: int = 64  # cache mode: top-k log-probs stored per token (64: ~258 bytes/token)
    pairs: str | None = None  # sequences mode: JSONL of {"prompt","response"} or {"messages": [...]}
    prompts: str | None = None  # sequences mode without pairs: prompts (.txt one a line, or .jsonl) to sample
    gen_max_new_tokens: int = 128  # sequences mode: teacher generation length
    gen_temperature: float = 0.7  # sequences mode: sampling temperature (0 = greedy)
    max_train_blocks: int | None = None  # use only the first N training blocks (e.g. steps x batch: what a cache needs)
    # task mode (the `task` section's train split): train on the teacher's answers to its prompts
    # ("teacher": sequence-level KD, `gen_samples` each, greedy at gen_temperature 0) or on the
    # gold answers ("gold": SFT, the baseline distillation is measured against)
    task_targets: str = "teacher"
    teacher_logits: bool = True  # task/teacher: also match the teacher's logits on them (white-box; one vocabulary)
    gen_samples: int = 1

    def validate(self, where: str) -> None:
        _choice(f"{where}.mode", self.mode, ("text", "cache", "sequences", "task"))
        _choice(f"{where}.task_targets", self.task_targets, ("teacher", "gold"))
        _positive(f"{where}.gen_samples", self.gen_samples)
        if not 1 <= self.cache_k <= 65536:
            raise UserError(f"{where}.cache_k must be between 1 and 65536, got {self.cache_k}")
        if self.mode == "sequences":
            if not self.pairs and not self.prompts:
                raise UserError(
                    f"{where}.mode: sequences needs {where}.pairs (a prompt/response JSONL) or "
                    f"{where}.prompts (prompts for the teacher to answer)"
                )
            # parsed now, so a malformed line is reported before any stage spends time
            from toolchain.data.task_files import read_pairs, read_prompts

            if self.pairs:
                n = len(read_pairs(_existing_file(f"{where}.pairs", self.pairs)))
                if n < 2:
                    raise UserError(
                        f"{where}.pairs: {self.pairs} holds {n} example; sequence-level KD needs at "
                        "least 2 (one is held out for evaluation)"
                    )
            elif self.prompts:
                read_prompts(_existing_file(f"{where}.prompts", self.prompts))
        _positive(f"{where}.gen_max_new_tokens", self.gen_max_new_tokens)
        if self.max_train_blocks is not None:
            _positive(f"{where}.max_train_blocks", self.max_train_blocks)
        if self.gen_temperature < 0:
            raise UserError(f"{where}.gen_temperature must be >= 0, got {self.gen_temperature}")
        _positive(f"{where}.seq_len", self.seq_len)
        _positive(f"{where}.eval_sequences", self.eval_sequences)
        _non_negative(f"{where}.seed", self.seed)
        if not 0.0 < self.heldout_fraction < 1.0:
            raise UserError(f"{where}.heldout_fraction must be between 0 and 1, got {self.heldout_fraction}")
        if self.source != "pydoc" and not Path(self.source).is_file():
            raise UserError(f"{where}.source: '{self.source}' is neither 'pydoc' nor an existing text file")


DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device_spec(spec: str, where: str) -> None:
    """The spelling of a device setting (whether that GPU exists is checked where it is used)."""
    if not isinstance(spec, str) or not DEVICE_PATTERN.match(spec):
        raise UserError(f"{where} must be auto, cpu, cuda or cuda:N (a GPU index), got {spec!r}")


@dataclass
class DistillConfig:
    steps: int = 40
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 4
    alpha: float = 0.5  # weight of hard-label CE; (1 - alpha) goes to T^2 * KL
    temperature: float = 2.0
    grad_clip: float = 1.0
    checkpoint_every: int = 10
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 = all cores
    loss: str = "forward_kl"  # forward_kl | reverse_kl | jsd | skew_kl | skew_reverse_kl | tvd
    beta: float = 0.5  # jsd: mixture weight of the teacher (0 = forward KL, 1 = reverse KL, as TRL's GKD)
    skew: float = 0.1  # skew_kl: KL(P || skew * P + (1 - skew) * Q)
    grad_accum: int = 1  # micro-batches per optimizer step (token-weighted)
    precision: str = "fp32"  # fp32 | bf16 (autocast: matmuls in bf16, losses and weights in fp32)
    # torch.compile the teacher's and student's decoder bodies (inductor fuses their elementwise
    # ops; ~25 s of compiling, then ~6% faster steps on SmolLM2 here: pays off on long runs)
    compile: bool = False
    # auto | cpu | cuda | cuda:N; auto = the GPU when torch sees one (each launcher process its
    # LOCAL_RANK's), else the CPU
    device: str = "auto"
    # held-out evaluation every N steps into the history, watched by the divergence guard;
    # auto: about five per run; 0: only before and after
    eval_every: int | str = "auto"
    # stop when held-out KL or CE exceeds this many times its lowest value so far, keeping the
    # best weights (0: never stop, only report the best step)
    divergence_ratio: float = 1.5
    on_policy_fraction: float = (
        0.0  # GKD lambda: share of micro-batches continued by the student, scored by the teacher
    )
    on_policy_prompt_tokens: int = 32  # prefix of each sequence kept as the prompt for on-policy samples
    on_policy_temperature: float = 1.0  # sampling temperature of the student's continuations
    lora: LoraConfig = field(default_factory=LoraConfig)  # LoRA student (merged into the saved student)
    hidden_loss: str = "none"  # none | mse | cosine: also match mapped student/teacher hidden states
    hidden_weight: float = 1.0  # weight of the hidden-state term added to the logit loss
    eval_sets: list[str] = field(default_factory=list)  # extra text files evaluated like the held-out split

    def validate(self, where: str) -> None:
        _choice(f"{where}.loss", self.loss, DISTILL_LOSSES)
        _positive(f"{where}.grad_accum", self.grad_accum)
        _choice(f"{where}.precision", self.precision, ("fp32", "bf16"))
        if not isinstance(self.compile, bool):
            raise UserError(f"{where}.compile must be true or false, got {self.compile!r}")
        check_device_spec(self.device, f"{where}.device")
        self.lora.validate(f"{where}.lora")
        for path in self.eval_sets:
            if not Path(path).is_file():
                raise UserError(f"{where}.eval_sets: '{path}' is not an existing text file")
        _choice(f"{where}.hidden_loss", self.hidden_loss, ("none", "mse", "cosine"))
        if self.hidden_weight < 0:
            raise UserError(f"{where}.hidden_weight must be >= 0, got {self.hidden_weight}")
        if not 0.0 <= self.on_policy_fraction <= 1.0:
            raise UserError(f"{where}.on_policy_fraction must be between 0 and 1, got {self.on_policy_fraction}")
        _positive(f"{where}.on_policy_prompt_tokens", self.on_policy_prompt_tokens)
        _positive(f"{where}.on_policy_temperature", self.on_policy_temperature)
        if self.eval_every != "auto" and (isinstance(self.eval_every, str) or self.eval_every < 0):
            raise UserError(f"{where}.eval_every must be auto or an integer >= 0, got {self.eval_every!r}")
        if self.divergence_ratio != 0 and self.divergence_ratio <= 1:
            raise UserError(f"{where}.divergence_ratio must be 0 (off) or > 1, got {self.divergence_ratio}")
        for name in ("beta", "skew"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"{where}.{name} must be between 0 and 1, got {getattr(self, name)}")
        _positive(f"{where}.batch_size", self.batch_size)
        _positive(f"{where}.temperature", self.temperature)
        _positive(f"{where}.checkpoint_every", self.checkpoint_every)
        _positive(f"{where}.grad_clip", self.grad_clip)  # 0 would clip every update to nothing
        for name in ("steps", "warmup_steps", "threads", "seed", "weight_decay"):
            _non_negative(f"{where}.{name}", getattr(self, name))
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"{where}.alpha must be between 0 and 1, got {self.alpha}")
        if self.lr <= 0:
            raise UserError(f"{where}.lr must be > 0, got {self.lr}")


@dataclass
class ExportConfig:
    gguf: list[str] = field(default_factory=lambda: ["F16", "Q8_0", "Q4_K_M"])
    onnx: bool = True
    # per-tensor GGUF types: {tensor-name regex: type}, e.g. {"token_embd": "Q8_0", "^output": "F16"}
    gguf_overrides: dict[str, str] = field(default_factory=dict)
    # ONNX precisions: fp32 is always written (the others are made from it); fp16, int8 and
    # int4 each add a self-contained folder beside it (export/onnx-int4/, ...)
    onnx_precisions: list[str] = field(default_factory=lambda: ["fp32"])
    # an importance matrix measured on imatrix_rows calibration rows (the task's inputs, or the
    # text) weighs llama.cpp's rounding of the types it quantizes (K-quants, IQ types); the file
    # is kept as export/imatrix.gguf in llama.cpp's format (benchmarks/quant_quality.py: it lowers
    # the KLD of Q4_0, Q4_K_M and IQ4_XS by 38-50% on SmolLM2)
    imatrix: bool = True
    imatrix_rows: int = 32

    def validate(self, where: str) -> None:
        from toolchain.formats import NEEDS_IMATRIX, SUPPORTED_TYPES

        for q in self.gguf:
            _choice(f"{where}.gguf", q, SUPPORTED_TYPES)
            if q in NEEDS_IMATRIX and not self.imatrix:
                raise UserError(f"{where}.gguf: {q} needs an importance matrix; set {where}.imatrix: true")
        _positive(f"{where}.imatrix_rows", self.imatrix_rows)
        if self.gguf_overrides:
            from toolchain.formats import check_overrides

            for q in self.gguf:
                if q not in ("F16", "F32"):
                    check_overrides(self.gguf_overrides, q)
        from toolchain.formats import ONNX_PRECISIONS

        for q in self.onnx_precisions:
            _choice(f"{where}.onnx_precisions", q, ONNX_PRECISIONS)


@dataclass
class VerifyConfig:
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    greedy_tokens: int = 64
    # per GGUF type: max normalised MSE of next-token logits vs torch (fp32)
    max_nmse: dict[str, float] = field(
        default_factory=lambda: {"F32": 1e-6, "F16": 1e-4, "BF16": 1e-3, "Q8_0": 2e-3, "default": 0.1}
    )
    # per GGUF type: min fraction of greedy tokens equal to torch's
    min_greedy_agreement: dict[str, float] = field(default_factory=lambda: {"F32": 1.0, "F16": 1.0, "default": 0.0})
    onnx_max_abs_diff: float = 1e-3
    # prompts (GGUF and ONNX checks alike) are topped up to this many with held-out text openings
    min_prompts: int = 16
    # GGUF quality table (PPL ratio, mean KLD, top-1 vs the F16 file) on this many held-out
    # tokens in chunks of quality_ctx (second half of each chunk scored); 0 turns it off
    quality_tokens: int = 2048
    quality_ctx: int = 512
    max_ppl_ratio: dict[str, float | None] = field(
        default_factory=lambda: {"F32": 1.002, "BF16": 1.01, "Q8_0": 1.01, "default": None}
    )
    max_mean_kld: dict[str, float | None] = field(default_factory=lambda: {"Q8_0": 0.01, "default": None})
    min_top1_agreement: dict[str, float | None] = field(default_factory=lambda: {"default": None})
    onnx_fp16_max_abs_diff: float = 2e-2
    # quantized ONNX (int8/int4): min top-1 agreement and max mean KL(torch || onnx) per step
    onnx_min_top1: dict[str, float] = field(default_factory=lambda: {"int8": 0.95, "int4": 0.90})
    onnx_max_kl: dict[str, float] = field(default_factory=lambda: {"int8": 0.05, "int4": 0.25})

    def validate(self, where: str) -> None:
        if not self.prompts:
            raise UserError(f"{where}.prompts must list at least one prompt")
        _positive(f"{where}.greedy_tokens", self.greedy_tokens)
        if self.quality_tokens and self.quality_tokens < self.quality_ctx:
            raise UserError(
                f"{where}.quality_tokens ({self.quality_tokens}) must be 0 or >= quality_ctx ({self.quality_ctx})"
            )
        _positive(f"{where}.min_prompts", self.min_prompts)
        _positive(f"{where}.quality_ctx", self.quality_ctx)
        _non_negative(f"{where}.quality_tokens", self.quality_tokens)
        _positive(f"{where}.onnx_max_abs_diff", self.onnx_max_abs_diff)
        _positive(f"{where}.onnx_fp16_max_abs_diff", self.onnx_fp16_max_abs_diff)
        self._check_threshold_keys(where)
        self._check_threshold_values(where)

    def _check_threshold_values(self, where: str) -> None:
        fractions = ("min_greedy_agreement", "min_top1_agreement", "onnx_min_top1")
        for name in ("max_nmse", "max_mean_kld", "onnx_max_kl", *fractions, "max_ppl_ratio"):
            for key, value in getattr(self, name).items():
                if value is None:
                    continue
                _non_negative(f"{where}.{name}.{key}", value)
                if name in fractions and value > 1:
                    raise UserError(f"{where}.{name}.{key} is a fraction between 0 and 1, got {value}")
                if name == "max_ppl_ratio" and value < 1:
                    raise UserError(f"{where}.{name}.{key} must be >= 1 (a ratio to the F16 file), got {value}")

    def _check_threshold_keys(self, where: str) -> None:
        """A misspelt type in a threshold table would silently fall back to its default."""
        from toolchain.formats import ONNX_PRECISIONS, SUPPORTED_TYPES

        gguf_keys = (*SUPPORTED_TYPES, "default")
        for name in ("max_nmse", "min_greedy_agreement", "max_ppl_ratio", "max_mean_kld", "min_top1_agreement"):
            for key in getattr(self, name):
                _choice(f"{where}.{name} key", key, gguf_keys)
        quantized_onnx = [p for p in ONNX_PRECISIONS if p.startswith("int")]
        for name in ("onnx_min_top1", "onnx_max_kl"):
            for key in getattr(self, name):
                _choice(f"{where}.{name} key", key, quantized_onnx)


@dataclass
class BenchConfig:
    targets: list[str] = field(default_factory=lambda: ["cpu"])  # names in targets/ or YAML paths
    prompt_tokens: int = 512
    short_prompt_tokens: int = 32
    gen_tokens: int = 128
    runs: int = 5
    torch_baseline: bool = True  # also time the student in torch (eager), as a reference point

    def validate(self, where: str) -> None:
        from toolchain.targets import load_target

        for t in self.targets:
            load_target(t)  # a bad target file fails here, before hours of distillation
        _positive(f"{where}.prompt_tokens", self.prompt_tokens)
        _positive(f"{where}.short_prompt_tokens", self.short_prompt_tokens)
        _positive(f"{where}.gen_tokens", self.gen_tokens)
        if self.runs < 3:
            raise UserError(f"{where}.runs must be >= 3 (a median needs several runs), got {self.runs}")


class _Section(Protocol):
    """What every section dataclass of Config has."""

    def validate(self, where: str) -> None: ...


@dataclass
class Config:
    name: str = "student"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    pack: PackConfig = field(default_factory=PackConfig)

    def validate(self, where: str = "config") -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                cast(_Section, value).validate(f"{f.name}")
        self._check_pack()
        self._check_qat()
        needs_task = {"data.mode: task": self.data.mode == "task", "finetune.enabled": self.finetune.enabled}
        for what, needed in needs_task.items():
            if needed and self.task.path is None:
                raise UserError(f"{what} trains on the task's examples: set task.path to its JSONL")

    def _check_qat(self) -> None:
        """Training through a GGUF type's rounding is for the file of that type the run writes."""
        from toolchain.formats import FAKE_QUANT_TYPES

        qat = self.quantize.qat
        if qat == "none":
            return
        if qat == "int4":
            if not self.export.onnx or "int4" not in self.export.onnx_precisions:
                raise UserError(
                    "quantize.qat: int4 trains for the int4 ONNX export: set export.onnx_precisions to include int4"
                )
            return
        if qat not in self.export.gguf:
            raise UserError(f"quantize.qat: {qat} is not among export.gguf ({', '.join(self.export.gguf)}): add it")
        for pattern, t in self.export.gguf_overrides.items():
            if t not in FAKE_QUANT_TYPES:
                raise UserError(
                    f"quantize.qat: export.gguf_overrides gives {pattern!r} type {t}, which has no exact "
                    f"training rounding (use {', '.join(FAKE_QUANT_TYPES)})"
                )

    def _check_pack(self) -> None:
        """The bundle can only hold what the run exports."""
        exported = {
            "gguf": list(self.export.gguf),
            "onnx": (["fp32", *self.export.onnx_precisions] if self.export.onnx else []),
        }
        for fmt, chosen in (("gguf", self.pack.gguf), ("onnx", self.pack.onnx)):
            missing = [q for q in chosen or () if q not in exported[fmt]]
            if missing and self.pack.enabled:
                raise UserError(
                    f"pack.{fmt} names {', '.join(missing)}, which the run does not export "
                    f"(export {fmt}: {', '.join(exported[fmt]) or 'none'}); add it to the export section"
                )
