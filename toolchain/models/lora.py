"""LoRA: train low-rank adapters instead of every weight (a student in distill, the teacher in
finetune), then merge them into the saved model, so what ships is a plain HF model (no peft at
inference)."""

from __future__ import annotations

from toolchain.config import LoraConfig
from toolchain.errors import UserError


def attach_lora(model, cfg: LoraConfig, where: str = "distill.lora"):
    """The model wrapped with fresh LoRA adapters on `cfg.targets`; other weights frozen."""
    import peft

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in cfg.targets if t not in names]
    if missing:
        raise UserError(
            f"{where}.targets {missing} are not module names of this model; "
            f"choose among e.g. {sorted(n for n in names if n.endswith('proj'))}"
        )
    pcfg = peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]  # peft annotates int; any number works (alpha / r)
        target_modules=list(cfg.targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, pcfg)


def merge_lora(model):
    """Fold the adapters into the base weights; returns the plain transformers model."""
    return model.merge_and_unload()
