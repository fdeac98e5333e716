"""The task sections: the user's task data and graders, and fine-tuning the teacher on it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from toolchain.config.checks import choice, existing_file, non_negative, positive
from toolchain.data.graders import GraderConfig
from toolchain.errors import UserError


@dataclass
class LoraConfig:
    r: int = 0  # LoRA rank; 0 = train the whole model
    alpha: float = 16.0  # LoRA scaling numerator (the update is scaled by alpha / r)
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    def validate(self, where: str) -> None:
        if self.r < 0:
            raise UserError(f"{where}.r must be >= 0 (0 = full training), got {self.r}")
        positive(f"{where}.alpha", self.alpha)
        if self.r and not self.targets:
            raise UserError(f"{where}.targets must name at least one module type, e.g. q_proj")


@dataclass
class TaskConfig:
    """The user's task (toolchain/data/tasks.py): examples, graders, splits, eval generation."""

    path: str | None = None  # JSONL of {"messages"| "prompt"/"response", "bucket"?, "answer"?}
    grader: GraderConfig = field(default_factory=GraderConfig)  # for every bucket without its own
    bucket_graders: dict[str, GraderConfig] = field(default_factory=dict)
    eval_fraction: float = 0.2  # per bucket, held out for evaluation (never trained on)
    calib_fraction: float = 0.05  # per bucket, for student selection and calibration
    seed: int = 0
    max_eval_per_bucket: int | None = None  # cap the eval split (generation is the slow part)
    min_eval_per_bucket: int = 20  # fewer eval examples in a bucket: a warning with the counts
    max_new_tokens: int = 32  # answer length when evaluating
    license: str | None = None  # the data's licence (SPDX id or words), recorded in the bundle's provenance
    source: str | None = None  # where the data comes from (a package, a URL), for the same record
    # more training examples in the same format (e.g. `toolchain disagree --out`): train split only
    extra_train: str | None = None

    def validate(self, where: str) -> None:
        self.grader.validate(f"{where}.grader")
        for bucket, g in self.bucket_graders.items():
            g.validate(f"{where}.bucket_graders.{bucket}")
        for name in ("eval_fraction", "calib_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise UserError(f"{where}.{name} must be between 0 and 1, got {getattr(self, name)}")
        if self.eval_fraction + self.calib_fraction >= 1.0:
            raise UserError(f"{where}: eval_fraction + calib_fraction must leave examples to train on")
        non_negative(f"{where}.seed", self.seed)
        positive(f"{where}.max_new_tokens", self.max_new_tokens)
        positive(f"{where}.min_eval_per_bucket", self.min_eval_per_bucket)
        if self.max_eval_per_bucket is not None:
            positive(f"{where}.max_eval_per_bucket", self.max_eval_per_bucket)
        if self.path is not None:
            self.splits()  # reads and checks every line now, before any stage spends time

    def splits(self):
        """The task's train / calib / eval splits (`data.tasks.TaskSplits`)."""
        from toolchain.data.tasks import read_task, split_task

        examples = read_task(existing_file("task.path", self.path or ""), self.grader, self.bucket_graders)
        splits = split_task(
            examples,
            self.eval_fraction,
            self.calib_fraction,
            self.seed,
            self.max_eval_per_bucket,
            self.min_eval_per_bucket,
        )
        if self.extra_train:
            held = {json.dumps(e.prompt) for e in splits.eval + splits.calib}
            extra = read_task(existing_file("task.extra_train", self.extra_train), self.grader)
            leaked = [e.line for e in extra if json.dumps(e.prompt) in held]
            if leaked:
                raise UserError(
                    f"task.extra_train line {leaked[0]} (and {len(leaked) - 1} more) is a prompt of the eval or "
                    "calibration split; training on it would inflate the scores: make it from other prompts"
                )
            splits.train.extend(extra)
        return splits


@dataclass
class FinetuneConfig:
    """Fine-tuning the teacher on the task's train split before anything is distilled from it."""

    enabled: bool = False  # the pipeline's finetune stage; `toolchain finetune` runs regardless
    method: str = "lora"  # lora | qlora (4-bit base through bitsandbytes, CPU works) | full
    steps: int = 100
    batch_size: int = 8
    lr: float = 2e-4
    warmup_steps: int = 10
    seq_len: int = 256  # tokens per example (prompt + answer); longer answers are cut
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=16, alpha=32.0))
    keep_adapter: bool = False  # also save the adapter beside the merged model
    checkpoint_every: int = 25
    seed: int = 0

    def validate(self, where: str) -> None:
        choice(f"{where}.method", self.method, ("lora", "qlora", "full"))
        for name in ("steps", "batch_size", "seq_len", "checkpoint_every", "lr"):
            positive(f"{where}.{name}", getattr(self, name))
        non_negative(f"{where}.warmup_steps", self.warmup_steps)
        non_negative(f"{where}.seed", self.seed)
        self.lora.validate(f"{where}.lora")
        if self.method != "full" and self.lora.r < 1:
            raise UserError(f"{where}.lora.r must be >= 1 for method {self.method} (or use method: full)")
