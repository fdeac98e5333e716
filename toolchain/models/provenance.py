"""Where a model comes from, said without the user's directory layout.

Exports are published: a GGUF's metadata, a report or a bundle must name the teacher by
something that means the same on another machine (a hub id, a bundled name, a file's base
name) and pin it by content (sha256), never by an absolute path.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path

from toolchain.fileio import sha256_file

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PATH_KEYS = ("source", "adapter", "distilled_from")


def is_hub_id(text: str) -> bool:
    """'org/name' (a Hugging Face repo id), as opposed to a path such as './x/y' or '/a/b'."""
    return bool(_HUB_ID.match(text)) and not Path(text).expanduser().exists()


def public_name(spec: str | os.PathLike) -> str:
    """A name fit to publish: a hub id or plain name as it is, a path reduced to its base name."""
    text = str(spec)
    if is_hub_id(text) or ("/" not in text and os.sep not in text):
        return text
    return Path(text.rstrip("/" + os.sep)).name or text


def public_meta(meta: dict) -> dict:
    """`meta` with every path-valued provenance entry reduced to a public name."""
    return {k: public_name(v) if k in PATH_KEYS and isinstance(v, str) else v for k, v in meta.items()}


@functools.lru_cache(maxsize=64)
def _file_sha256(path: Path, size: int, mtime_ns: int) -> str:
    return sha256_file(path, 1 << 22)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (memoised per path, size and mtime: stages of one run hash it once)."""
    p = Path(path).resolve()
    st = p.stat()
    return _file_sha256(p, st.st_size, st.st_mtime_ns)


def model_dir_sha256(model_dir: str | os.PathLike) -> str:
    """One sha256 for an HF directory's weights and config: over (name, sha256) of each
    safetensors file and config.json, in name order (tokenizer files are not weights)."""
    d = Path(model_dir)
    parts = [(p.name, file_sha256(p)) for p in sorted(d.glob("*.safetensors")) + [d / "config.json"] if p.is_file()]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()
