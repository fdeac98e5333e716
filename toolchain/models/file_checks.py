"""Refuse truncated or corrupt model files with a message, not a traceback from deep inside a reader.

Both formats start with a header that says where every tensor lies, so a file cut short (an
interrupted download or copy) is caught by comparing the header's last offset with the file size,
before any weights are read.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from toolchain.errors import UserError


def check_gguf(path: str | os.PathLike) -> tuple[dict, list]:
    """(metadata, tensor table) of a GGUF, or a UserError saying why the file cannot be read.

    Reads only the header (~0.1 s), so every route that takes a GGUF can check it up front.
    """
    from toolchain.models.gguf_header import read_gguf_header

    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
    try:
        meta, tensors = read_gguf_header(path)
    except (ValueError, OverflowError, MemoryError) as e:
        raise UserError(
            f"{path} is truncated or corrupt; it cannot be read as GGUF ({e}); re-download or re-export it"
        ) from None
    size = path.stat().st_size
    end = max((t.data_offset + t.n_bytes for t in tensors), default=0)
    if end > size:
        raise UserError(
            f"{path} is truncated: its tensors need {end} bytes but the file has {size}; re-download or re-export it"
        )
    return meta, tensors


def open_gguf(path: str | os.PathLike):
    """A gguf.GGUFReader for `path` (full metadata values), after `check_gguf` accepted it."""
    import gguf

    check_gguf(path)
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader fails in many ways (struct, numpy, unicode) on bad bytes
        raise UserError(
            f"{path} is truncated or corrupt; it cannot be read as GGUF ({type(e).__name__}: {e}); "
            "re-download or re-export it"
        ) from None


def check_safetensors(path: str | os.PathLike) -> None:
    """Raise a UserError if a .safetensors file's header is unreadable or the file is cut short."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a valid safetensors file ({e}); re-download or re-save the model") from None
    if 8 + n + end > size:
        raise UserError(
            f"{path} is truncated: its tensors need {8 + n + end} bytes but the file has {size}; "
            "re-download or re-save the model"
        )


def check_model_dir_weights(model_dir: str | os.PathLike) -> None:
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        check_safetensors(f)
