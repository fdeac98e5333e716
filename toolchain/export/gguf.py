"""HF safetensors directory -> GGUF files, with our own writer on the `gguf` package.

Architecture specifics (hyper-parameter keys, Q/K permutation, tied heads) come from the
per-family module found by `model_type`; names come from gguf's tensor-name map, never from
string literals here. Python types are written directly; K-quants are made from an F16 file by
llama.cpp. Every file is written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from toolchain import __version__
from toolchain.errors import UserError
from toolchain.export.gguf_vocab import write_vocab
from toolchain.fileio import atomic_path, sha256_file
from toolchain.formats import PYTHON_TYPES, Artifact, check_overrides, check_type, override_for
from toolchain.models.load import read_meta
from toolchain.models.provenance import is_hub_id, public_meta
from toolchain.models.registry import get_arch
from toolchain.quantize.gguf_types import file_type, llama_cpp_quantize, quantize_tensor
from toolchain.quantize.weighted import WEIGHTED_TYPES

log = logging.getLogger(__name__)


def gguf_filename(type_name: str) -> str:
    return f"model-{type_name}.gguf"


def _load_hf(model_dir: Path):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} is not an HF model directory (no config.json)")
    config = AutoConfig.from_pretrained(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir} has no .safetensors weights; save the model with safe_serialization")
    from toolchain.models.file_checks import check_model_dir_weights

    check_model_dir_weights(model_dir)
    state = {}
    for f in files:
        state.update(load_file(f))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return config, state, tokenizer


def _size_label(n_params: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n_params >= div:
            return f"{n_params / div:.0f}{suffix}"
    return str(n_params)


def _repo_url(source: str | None) -> str | None:
    # "org/name" is a Hugging Face repo id; a URL is kept; anything else has no address
    if source and is_hub_id(source):
        return f"https://huggingface.co/{source}"
    return source if source and "://" in source else None


def qat_tensor_types(model_dir: str | os.PathLike, type_name: str, overrides: dict[str, str] | None) -> dict | None:
    """{GGUF tensor name: type} of llama.cpp's own `type_name` file of this model (its mix, its
    fallbacks), for a K-quant that quantization-aware distillation trains through; None for the
    types whose every tensor our writer decides (Q4_0, Q8_0) and for int4."""
    from toolchain.formats import QAT_MIX_TYPES
    from toolchain.models.file_checks import open_gguf

    if type_name not in QAT_MIX_TYPES:
        return None
    with tempfile.TemporaryDirectory(prefix="qat-mix-") as tmp:
        f16, mixed = Path(tmp) / "f16.gguf", Path(tmp) / "mixed.gguf"
        write_gguf(model_dir, f16, "F16")
        llama_cpp_quantize(f16, mixed, type_name, overrides=overrides)
        return {t.name: t.tensor_type.name for t in open_gguf(mixed).tensors if len(t.shape) >= 2}


def _qat_gguf_type(meta: dict) -> str | None:
    """The GGUF type whose grid the weights were trained on (quantize.qat), if any."""
    from toolchain.formats import QAT_GGUF_TYPES

    t = (meta.get("qat") or {}).get("type")
    return t if t in QAT_GGUF_TYPES else None


def _trained_mix(meta: dict, type_name: str) -> dict[str, str] | None:
    """The per-tensor types a student was trained through for a `type_name` file, if it was."""
    qat = meta.get("qat") or {}
    return qat.get("tensors") if qat.get("type") == type_name else None


def _learned_scales(model_dir: Path, meta: dict, type_name: str, overrides: dict | None, mix: dict | None) -> dict:
    """{HF weight name: block scales} a learned-scale student trained for this file ({} when it
    did not, or for another type); a one-line error when the file's tensor types would differ
    from the trained ones (the scales belong to those types)."""
    from toolchain.quantize.qat import load_scales

    qat = meta.get("qat") or {}
    if not qat.get("scales") or qat.get("type") != type_name:
        return {}
    if not mix and dict(overrides or {}) != dict(qat.get("overrides") or {}):
        raise UserError(
            f"{model_dir} learned its {type_name} block scales with export.gguf_overrides "
            f"{qat.get('overrides') or {}}; export {type_name} with the same overrides"
        )
    return load_scales(model_dir, qat)


def _write_provenance(w, meta: dict) -> None:
    """general.source / general.base_model.* and toolchain.* keys: where the weights come from.

    A distilled student names its teacher as base model (with the teacher's licence, which
    usually still applies to the student); a plain conversion names its source.
    """
    meta = public_meta(meta)  # names, never this machine's paths (older students stored paths)
    teacher = meta.get("distilled_from")
    if teacher:
        w.add_base_model_count(1)
        w.add_base_model_name(0, str(teacher))
        if _repo_url(teacher):
            w.add_base_model_repo_url(0, _repo_url(teacher))
        w.add_string("toolchain.teacher.name", str(teacher))
        if meta.get("teacher_sha256"):
            w.add_string("toolchain.teacher.sha256", str(meta["teacher_sha256"]))
        if meta.get("teacher_license"):
            w.add_string("toolchain.teacher.license", str(meta["teacher_license"]))
        if meta.get("kept_layers") is not None:
            w.add_array("toolchain.student.kept_layers", [int(i) for i in meta["kept_layers"]])
    if _qat_gguf_type(meta):  # the weights were trained through this type's rounding (quantize.qat)
        w.add_string("toolchain.qat.type", _qat_gguf_type(meta))
    if not teacher and meta.get("source"):
        w.add_string("toolchain.source", str(meta["source"]))
        if meta.get("sha256"):
            w.add_string("toolchain.source.sha256", str(meta["sha256"]))
        if _repo_url(meta["source"]):
            w.add_source_url(_repo_url(meta["source"]))


def _write_imatrix_facts(w, facts: dict) -> None:
    """The keys llama-quantize records in a file it rounded with an importance matrix."""
    w.add_string("quantize.imatrix.file", str(facts.get("file", "")))
    w.add_string("quantize.imatrix.dataset", str(facts.get("dataset", "")))
    w.add_int32("quantize.imatrix.entries_count", int(facts.get("entries", 0)))
    w.add_int32("quantize.imatrix.chunks_count", int(facts.get("chunks", 0)))


def write_gguf(
    model_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    type_name: str,
    name: str | None = None,
    overrides: dict[str, str] | None = None,
    imatrix: tuple[dict, dict] | None = None,
    tensor_types: dict[str, str] | None = None,
) -> Path:
    """Write one GGUF of a Python-quantizable type (F32/F16/BF16/Q8_0/Q4_0/...).

    `overrides` maps GGUF tensor-name regexes to tensor types (e.g. {"token_embd": "Q8_0"}).
    `imatrix` ((importance per GGUF tensor name, facts)) weighs Q4_0/Q4_1/Q5_0/Q5_1 rounding
    (quantize/weighted.py), except for a student trained through its rounding (quantize.qat),
    whose weights are already the reference rounding's grid. `tensor_types` ({GGUF tensor name:
    type}) types every matrix instead: a K-quant file of a student trained through that mix.
    A student that learned its block scales (quantize.learn_scales) has them written as trained."""
    import gguf

    model_dir, out_path = Path(model_dir), Path(out_path)
    if type_name not in PYTHON_TYPES and not tensor_types:
        raise UserError(f"{type_name} is not written in Python; use export_gguf() which routes it through llama.cpp")
    overrides = {} if tensor_types else check_overrides(overrides, type_name)
    config, state, tokenizer = _load_hf(model_dir)
    arch = get_arch(config.model_type)
    meta = read_meta(model_dir)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_arch], config.num_hidden_layers)
    importance = imatrix[0] if imatrix is not None and not _qat_gguf_type(meta) else {}
    scales = _learned_scales(model_dir, meta, type_name, overrides, tensor_types)

    with atomic_path(out_path) as tmp:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch.gguf_arch]])
        n_params = 0
        for hf_name, data in arch.gguf_tensors(state, config):
            gguf_name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise UserError(f"no GGUF name for tensor '{hf_name}' of architecture {config.model_type}")
            n_params += data.size
            own = (tensor_types or {}).get(gguf_name) or override_for(gguf_name, overrides)
            scale = scales.get(hf_name)
            if scale is not None:  # rows permuted as the weight's are (arch.transform)
                scale = arch.transform(hf_name, scale.float().numpy(), config)
            qdata, qtype = quantize_tensor(data, type_name, own, importance.get(gguf_name), scale)
            w.add_tensor(gguf_name, qdata, raw_dtype=qtype)

        model_name = name or meta.get("name") or model_dir.name
        w.add_type("model")
        w.add_name(model_name)
        w.add_basename(model_name)
        w.add_size_label(_size_label(n_params))
        if meta.get("license"):
            w.add_license(meta["license"])
        _write_provenance(w, meta)
        w.add_description(f"Written by toolchain {__version__} from {model_name}")
        w.add_quantized_by(f"toolchain {__version__}")
        w.add_file_type(file_type(type_name))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if importance and type_name in WEIGHTED_TYPES:
            _write_imatrix_facts(w, imatrix[1] if imatrix else {})
        arch.write_hparams(w, config)

        write_vocab(w, tokenizer, model_dir, meta, config.vocab_size)

        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()
    return out_path


def export_gguf(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    types: list[str],
    name: str | None = None,
    overrides: dict[str, str] | None = None,
    imatrix: tuple[dict, dict] | None = None,
    judge: Judge | None = None,
) -> list[Artifact]:
    """Write `model-<TYPE>.gguf` for each type into out_dir; returns one record per file.

    `imatrix` ((importance per tensor, facts), quantize.imatrix) weighs llama.cpp's rounding of
    the types it quantizes (K-quants, IQ types) and our writer's Q4_0/Q4_1/Q5_0/Q5_1 (quantize/weighted.py).
    With a `judge` (F16 file, weighted file, plain file -> {"imatrix_kld", "plain_kld", ...}),
    each such type is also written without it and the file with the lower KLD is kept (the
    record's `imatrix` says which and why): an importance matrix does not help every model
    and type (it made Q4_0 worse on both distilled students measured).

    `overrides` ({GGUF tensor-name regex: tensor type}) apply to every type written, except the
    F16/F32 files, which stay exact references for verify and for the K-quants made from them."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    for t in types:
        check_type(t)
        if t not in ("F16", "F32"):
            check_overrides(overrides, t)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    f16 = _F16Source(model_dir, out_dir, name)
    meta = read_meta(model_dir)
    # F16 first, then the other Python types, then llama.cpp's (made from the F16)
    for t in sorted(types, key=lambda t: (t != "F16", t not in PYTHON_TYPES)):
        path = out_dir / gguf_filename(t)
        start = time.perf_counter()
        own = None if t in ("F16", "F32") else overrides
        trained_mix = _trained_mix(meta, t)
        if trained_mix:  # a student trained through this file's K-quant mix: our writer, its codes
            write_gguf(model_dir, path, t, name, tensor_types=trained_mix)
        else:
            _write_type(model_dir, path, t, name, own, imatrix, f16)
        choice = None
        if judge and imatrix and not trained_mix and _weighs(t, meta):
            plain = out_dir / f".{path.name}.plain"
            _write_type(model_dir, plain, t, name, own, None, f16)
            choice = _keep_better_rounding(path, plain, f16.path(), judge)
        record = Artifact(
            format="gguf",
            quant=t,
            path=str(path),
            bytes=path.stat().st_size,
            sha256=sha256_file(path),
            seconds=round(time.perf_counter() - start, 2),
        )
        if choice is not None:
            record["imatrix"] = choice
        records.append(record)
        log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    f16.cleanup()
    return records


Judge = Callable[[Path, Path, Path], dict]


class _F16Source:
    """The F16 file K-quants are made from and judged against: the run's own when it writes
    one (written first), else a temporary one, made on first use."""

    def __init__(self, model_dir: Path, out_dir: Path, name: str | None):
        self.model_dir, self.out_dir, self.name = model_dir, out_dir, name
        self.tmp: Path | None = None

    def path(self) -> Path:
        own = self.out_dir / gguf_filename("F16")
        if own.is_file():
            return own
        if self.tmp is None:
            fd, tmp = tempfile.mkstemp(suffix=".gguf", dir=self.out_dir, prefix=".f16-source-")
            os.close(fd)
            self.tmp = Path(tmp)
            write_gguf(self.model_dir, self.tmp, "F16", self.name)
        return self.tmp

    def cleanup(self) -> None:
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)


def _write_type(model_dir: Path, path: Path, t: str, name, overrides, imatrix, f16: _F16Source) -> None:
    if t in PYTHON_TYPES:
        write_gguf(model_dir, path, t, name, overrides, imatrix)
    else:
        llama_cpp_quantize(f16.path(), path, t, overrides=overrides, imatrix=imatrix)


def _weighs(type_name: str, meta: dict) -> bool:
    """Whether an importance matrix changes this type's file (and it can be made without one)."""
    from toolchain.formats import NEEDS_IMATRIX

    if type_name in NEEDS_IMATRIX or _qat_gguf_type(meta):
        return False
    return type_name in WEIGHTED_TYPES or type_name not in PYTHON_TYPES


def _keep_better_rounding(path: Path, plain: Path, reference: Path, judge: Judge) -> dict:
    """Keep at `path` the imatrix-weighted file (there now) or the plain one, whichever has the
    lower mean KLD to the F16 file; ties keep the importance matrix."""
    figures = judge(reference, path, plain)
    used = figures["imatrix_kld"] <= figures["plain_kld"]
    if used:
        plain.unlink()
    else:
        os.replace(plain, path)
    return {"used": used, **figures}


def summary_lines(files: list[Artifact]) -> list[str]:
    """What a user reads of each written file: size, time, and the importance-matrix choice."""
    lines = []
    for f in files:
        lines.append(f"{Path(f['path']).name}: {f['bytes'] / 1e6:.1f} MB in {f.get('seconds', 0):.1f} s")
        if "imatrix" in f:
            c = f["imatrix"]
            lines.append(
                f"  importance matrix {'kept' if c['used'] else 'left out'}: mean KLD to F16 "
                f"{c['imatrix_kld']:.4f} with it, {c['plain_kld']:.4f} without"
            )
    return lines
