"""Load a teacher or student: bundled name, HF directory (+ PEFT adapter), or GGUF file.

Everything comes back as a plain fp32 (or bf16) `transformers` model plus its tokenizer, and
a small `meta` dict of provenance (name, licence, source, GGUF pre-tokenizer) that travels
with the model into students and exports as `toolchain.json`.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolchain.errors import UserError
from toolchain.fileio import atomic_dir, cache_dir, exclusive_lock
from toolchain.models.bundled import BUNDLED, bundled_path
from toolchain.models.provenance import file_sha256, is_hub_id, model_dir_sha256, public_meta, public_name

log = logging.getLogger(__name__)

META_FILE = "toolchain.json"
DTYPES = ("float32", "bfloat16")
QUANTIZE_MODES = ("none", "8bit", "4bit")  # bitsandbytes
ADAPTER_MODES = ("merge", "attach")


@dataclass
class LoadedModel:
    model: Any  # a transformers model (or a peft wrapper of one)
    tokenizer: Any  # its transformers tokenizer
    path: Path  # HF directory the weights were read from
    meta: dict = field(default_factory=dict)


def read_meta(model_dir: str | os.PathLike) -> dict:
    p = Path(model_dir) / META_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def gguf_metadata(path: str | os.PathLike, keys: tuple[str, ...]) -> dict:
    """A few scalar metadata fields of a GGUF file (missing keys are left out)."""
    from toolchain.models.file_checks import check_gguf

    meta, _ = check_gguf(path)
    return {k: meta[k] for k in keys if k in meta}


def gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, meta: dict | None = None) -> Path:
    """Dequantize a GGUF through transformers and save it as an HF safetensors directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    fields = gguf_metadata(gguf_path, ("tokenizer.ggml.pre", "general.license", "general.name"))
    d, name = str(gguf_path.parent), gguf_path.name
    log.info("dequantizing %s through transformers (once; cached afterwards)", gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf and is not
    # serializable"): rebuild it from its config without the quantization entry.
    config = copy.deepcopy(loaded.config)  # not AutoConfig: that parses the whole file again
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=False)
    model.tie_weights()
    info = {
        "name": fields.get("general.name", gguf_path.stem),
        "license": fields.get("general.license"),
        "source": gguf_path.name,  # a name to publish, not this machine's path
        "sha256": file_sha256(gguf_path),
        "tokenizer_pre": fields.get("tokenizer.ggml.pre"),
    }
    info.update(meta or {})
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return Path(out_dir)


@functools.lru_cache(maxsize=16)
def _content_key(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of the file's bytes (~0.3 s per 100 MB): a key by content, not by path, so the
    same bundled GGUF installed into another venv (every fresh clone) reuses the one
    conversion instead of adding another ~540 MB copy to the cache. Memoised per (path, size,
    mtime) so the stages of one run that resolve the same teacher hash it once."""
    h = hashlib.sha256(b"gguf-hf|v3|")
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:16]


def _cached_gguf_conversion(gguf_path: Path, meta: dict | None = None) -> Path:
    st = gguf_path.stat()
    key = _content_key(gguf_path.resolve(), st.st_size, st.st_mtime_ns)
    out = cache_dir() / "gguf-hf" / f"{gguf_path.stem}-{key}"
    if not (out / "config.json").is_file():
        with exclusive_lock(out.with_name(out.name + ".lock")):  # another process may be converting it
            if not (out / "config.json").is_file():
                gguf_to_hf(gguf_path, out, meta)
    return out


def resolve_model_dir(spec: str) -> Path:
    """Turn a teacher spec (bundled name, GGUF path, HF dir) into an HF directory."""
    if spec in BUNDLED:
        entry = BUNDLED[spec]
        meta = {"name": entry.name, "license": entry.license, "source": entry.source}
        return _cached_gguf_conversion(bundled_path(spec), meta)
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(
            f"model not found: '{spec}' is neither a bundled model ({', '.join(BUNDLED)}) nor an existing path"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"{path} is a file but not a .gguf; give a GGUF file or an HF model directory")
        return _cached_gguf_conversion(path)  # checked (header only) when it is converted
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is a directory without config.json; it is not a Hugging Face model directory")
    return path


def load_model(
    spec: str,
    adapter: str | None = None,
    dtype: str = "float32",
    quantize: str = "none",
    adapter_mode: str = "merge",
    device: str = "cpu",
) -> LoadedModel:
    """Load a causal LM and its tokenizer: the one loader every route (teacher, student, verify) takes.

    `quantize` 8bit / 4bit loads the weights through bitsandbytes (CPU works) onto `device` (a
    quantized model cannot be moved later; an unquantized one loads on the CPU and is moved by
    whoever runs it). A PEFT adapter is merged into the weights, or attached as a separate LoRA
    path: attaching keeps the base weights bit-identical to the files, as a quantized base needs
    (merging LoRA deltas into int8/nf4 weights would round them away).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_variant(adapter, dtype, quantize, adapter_mode)
    model_dir = resolve_model_dir(spec)
    from toolchain.models.registry import get_arch

    config = json.loads((model_dir / "config.json").read_text())
    get_arch(config.get("model_type", "?"))  # refuse unsupported architectures up front
    from toolchain.models.file_checks import check_model_dir_weights

    check_model_dir_weights(model_dir)  # a truncated/corrupt file fails here with a clear message
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    if quantize != "none":
        try:
            import bitsandbytes  # noqa: F401
        except ModuleNotFoundError:
            raise UserError(f"teacher.quantize: {quantize} needs bitsandbytes: pip install bitsandbytes") from None
        kwargs.update(quantization_config=_bnb_config(quantize), device_map={"": device})
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)  # a PeftModel below when attached
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    meta = _provenance(model_dir, adapter)
    if adapter:
        model = merge_adapter(model, adapter) if adapter_mode == "merge" else attach_adapter(model, adapter)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, path=model_dir, meta=meta)


def _check_variant(adapter: str | None, dtype: str, quantize: str, adapter_mode: str) -> None:
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    if quantize not in QUANTIZE_MODES:
        raise UserError(f"teacher.quantize must be one of {', '.join(QUANTIZE_MODES)}, got '{quantize}'")
    if adapter_mode not in ADAPTER_MODES:
        raise UserError(f"teacher.adapter_mode must be one of {', '.join(ADAPTER_MODES)}, got '{adapter_mode}'")
    if adapter and quantize != "none" and adapter_mode == "merge":
        raise UserError(
            f"a LoRA adapter cannot be merged into a {quantize} teacher without rounding it away; "
            "set teacher.adapter_mode: attach (QLoRA-style) or teacher.quantize: none"
        )


def _provenance(model_dir: Path, adapter: str | None) -> dict:
    """The model's provenance (toolchain.json, else its directory), with names fit to publish and
    a sha256 of the weights; an adapter adds its own name and hash."""
    meta = read_meta(model_dir) or {"name": model_dir.name}
    if not meta.get("source"):
        hub = json.loads((model_dir / "config.json").read_text()).get("_name_or_path") or ""
        meta["source"] = hub if is_hub_id(hub) else meta["name"]
    meta = public_meta(meta)
    meta.setdefault("sha256", model_dir_sha256(model_dir))
    if adapter:
        a = Path(adapter)
        weights = sorted(a.glob("adapter_model.*"))
        meta.update(adapter=public_name(a), adapter_sha256=file_sha256(weights[0]) if weights else None)
    return meta


def merge_adapter(model, adapter: str | os.PathLike):
    """Apply a PEFT (LoRA) adapter directory and merge it into the base weights."""
    from peft import PeftModel

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{adapter} is not a PEFT adapter directory (no adapter_config.json)")
    return PeftModel.from_pretrained(model, adapter).merge_and_unload()


def attach_adapter(model, adapter: str | os.PathLike):
    """Attach a PEFT (LoRA) adapter beside the frozen base weights (a PeftModel)."""
    from peft import PeftModel

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{adapter} is not a PEFT adapter directory (no adapter_config.json)")
    return PeftModel.from_pretrained(model, adapter)


def save_model(model, tokenizer, out_dir: str | os.PathLike, meta: dict, files: dict | None = None) -> Path:
    """Save an HF safetensors directory atomically, with tokenizer and provenance; `files`
    ({path relative to the directory: {name: tensor}}) are saved in it as safetensors too."""
    from safetensors.torch import save_file

    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for rel, tensors in (files or {}).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / rel))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out_dir)


def count_params(model) -> int:
    # tied weights are one tensor; count each storage once
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


# ---------------------------------------------------------------------------- teacher variants


def _bnb_config(quantize: str):
    import torch
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    # nf4 with fp32 compute: the teacher's logits stay fp32; only weights are stored in 4 bits
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def load_teacher(
    spec: str,
    adapter: str | None = None,
    dtype: str = "float32",
    quantize: str = "none",
    adapter_mode: str = "merge",
    device: str = "cpu",
) -> LoadedModel:
    """`load_model`, with `meta["variant"]` recording what was loaded, so an offline teacher cache
    can tell two variants of the same files apart."""
    loaded = load_model(spec, adapter, dtype, quantize, adapter_mode, device)
    variant = {"dtype": dtype, "quantize": quantize, "adapter_mode": adapter_mode if adapter else None}
    loaded.meta = {**loaded.meta, "variant": variant}
    return loaded


def teacher_from_config(t, device: str = "cpu") -> LoadedModel:
    """`load_teacher` from a `TeacherConfig`: every command and the pipeline load a teacher here."""
    return load_teacher(t.model, t.adapter, t.dtype, t.quantize, t.adapter_mode, device=device)
