"""Read a GGUF file's header (metadata and tensor table) without loading weights.

A small reader of the GGUF layout rather than gguf.GGUFReader, which builds numpy views for every
vocabulary entry: with a 49k-token vocabulary it takes seconds per file, and loading a GGUF
teacher opens the file several times. This one steps over string arrays (vocabularies, merges)
and reads a header in ~0.1 s. It imports neither torch nor numpy-heavy readers, so the bench
can use it in a device venv.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

# GGUF metadata value types -> struct format (8 = string, 9 = array are handled apart)
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_DEFAULT_ALIGNMENT = 32


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        v = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return v[0] if len(v) == 1 else v

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise ValueError("a string runs past the end of the file")
        s = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return s.decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            return self.take(_SCALAR[vtype])
        etype, count = self.take("I"), self.take("Q")
        if etype == _STRING:
            # vocabularies and merges: step over the strings, keep only the count
            for _ in range(count):
                self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]
            return count
        if etype == _ARRAY:
            for _ in range(count):
                self.value(_ARRAY)
            return count
        fmt = _SCALAR[etype]
        start = self.pos
        self.pos += count * struct.calcsize("<" + fmt)
        # long numeric arrays (token scores, token types) are reduced to their length too
        return list(struct.unpack_from(f"<{count}{fmt}", self.buf, start)) if count <= 64 else count


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: list[int]
    type: str  # ggml type name: F16, Q8_0, ...
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute, in the file


def read_gguf_header(path: str | Path) -> tuple[dict, list[GGUFTensorInfo]]:
    """(metadata, tensors) of a GGUF; string arrays (vocab, merges) are reduced to their length.

    Raises ValueError on a file that is not GGUF or whose header is cut short or malformed.
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if bytes(mm[:4]) != b"GGUF":
            raise ValueError("not a GGUF file (no GGUF magic)")
        c = _Cursor(mm)
        c.pos = 4
        try:
            version = c.take("I")
            if version < 2:
                raise ValueError(f"GGUF version {version} is too old")
            n_tensors, n_kv = c.take("Q"), c.take("Q")
            meta = {}
            for _ in range(n_kv):
                key = c.string()
                meta[key] = c.value(c.take("I"))
            raw = []
            for _ in range(n_tensors):
                name = c.string()
                dims = [c.take("Q") for _ in range(c.take("I"))]
                raw.append((name, dims, GGMLQuantizationType(c.take("I")), c.take("Q")))
        except (struct.error, KeyError) as e:
            raise ValueError(f"malformed header ({type(e).__name__}: {e})") from None
        align = int(meta.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_start = -(-c.pos // align) * align
    tensors = []
    for name, dims, ttype, offset in raw:
        n = 1
        for d in dims:
            n *= d
        block, type_size = GGML_QUANT_SIZES[ttype]
        tensors.append(GGUFTensorInfo(name, dims, ttype.name, n, n // block * type_size, data_start + offset))
    return meta, tensors
