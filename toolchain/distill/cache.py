"""Offline teacher cache: run the teacher once, train many times without it.

For every training block the teacher's top-k next-token log-probabilities (T=1, normalised over
the whole vocabulary, so the tail mass is 1 - sum(exp(topk))) are stored with their token ids:

- ids as uint16 when the vocabulary fits (<= 65536 rows), else int32;
- log-probs as fp16 (a relative error of ~1e-3 on each probability);
- the input tokens themselves (same id dtype), so training reads only the cache.

At k=64 and a 49152-token vocabulary that is 64 * (2 + 2) + 2 = 258 bytes per token.

Blocks are written in shards (`shard-00000.safetensors`, ...), each one atomically, so a build
that is interrupted resumes at the first missing shard. `manifest.json` is written last; its
`fingerprint` (teacher weights digest, tokenizer vocabulary digest, data digest, k, seq_len)
is checked before training, and a cache made with another teacher, tokenizer or data is refused
with the field that differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from toolchain.data.batch_order import batch_indices
from toolchain.devices.placement import model_device
from toolchain.distill.batch import Batch
from toolchain.errors import UserError
from toolchain.fileio import atomic_path, write_json

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
BUILD_STATE = "build.json"  # the fingerprint of a build in progress, so a rerun can resume it
FORMAT_VERSION = 1
_HASH_CHUNK = 1 << 22


# ---------------------------------------------------------------------------- fingerprints


def _sha256_files(paths: list[Path], h=None):
    h = h or hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while block := f.read(_HASH_CHUNK):
                h.update(block)
    return h


def teacher_digest(
    model_dir: str | os.PathLike, adapter: str | os.PathLike | None = None, variant: dict | None = None
) -> str:
    """Digest of the teacher as loaded: config + weight files (+ adapter files) + load variant.

    Read from the files, not the loaded tensors, so a run that trains from the cache can check
    its teacher without loading it. `variant` holds what changes the logits without changing
    the files (dtype, bitsandbytes quantization, adapter merged or attached).
    """
    model_dir = Path(model_dir)
    files = [model_dir / "config.json"] + sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin"))
    h = _sha256_files([p for p in files if p.is_file()])
    if adapter:
        a = Path(adapter)
        _sha256_files(sorted(p for p in a.iterdir() if p.is_file() and p.name.startswith("adapter_")), h)
    h.update(json.dumps(variant or {}, sort_keys=True).encode())
    return h.hexdigest()


def vocab_digest(tokenizer) -> str:
    """Digest of the token -> id map (added and special tokens included)."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


def data_digest(blocks: torch.Tensor) -> str:
    blocks = blocks.to(torch.int64).contiguous()
    h = hashlib.sha256(str(tuple(blocks.shape)).encode())
    h.update(blocks.numpy().tobytes())
    return h.hexdigest()


def fingerprint(teacher: str, vocab: str, data: str, k: int, seq_len: int) -> dict:
    return {
        "teacher": teacher,
        "vocab": vocab,
        "data": data,
        "k": int(k),
        "seq_len": int(seq_len),
        "format": FORMAT_VERSION,
    }


_FIELD_WHY = {
    "teacher": "it was made with another teacher (weights, adapter or quantization differ)",
    "vocab": "it was made with another tokenizer",
    "data": "it was made from other training text (data.source, seq_len, split or seed differ)",
    "k": "it stores another top-k",
    "seq_len": "it was made with another data.seq_len",
    "format": "it was written by another version of the cache format",
}


def check_fingerprint(found: dict, expected: dict, where: str | os.PathLike) -> None:
    """Refuse a cache whose fingerprint differs from what this run would produce, saying why."""
    for key in ("format", "teacher", "vocab", "data", "k", "seq_len"):
        if key in expected and found.get(key) != expected[key]:
            raise UserError(
                f"teacher cache {where} does not match this run: {_FIELD_WHY[key]} "
                f"(cache {key}={str(found.get(key))[:16]}, this run {str(expected[key])[:16]}); "
                "rebuild it with `toolchain distill-cache` or point data.cache_dir at a new folder"
            )


# ---------------------------------------------------------------------------- building


def _id_dtype(vocab: int) -> torch.dtype:
    return torch.uint16 if vocab <= 65536 else torch.int32


@torch.no_grad()
def teacher_topk(teacher, inputs: torch.Tensor, k: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k log-probs (fp32) and ids of the teacher at every position of `inputs` [B, L].

    The softmax runs over the first `vocab` rows only: rows past the tokenizer's size are
    embedding padding that no real token ever uses.
    """
    logits = teacher(inputs.to(model_device(teacher))).logits[..., :vocab].float()
    logp = torch.log_softmax(logits, dim=-1)
    values, ids = logp.topk(k, dim=-1)
    return values.cpu(), ids.cpu()  # stored from the CPU, whatever device the teacher runs on


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


@dataclass
class _Layout:
    """What a build stores, fixed by the blocks and the teacher before any shard is written."""

    k: int
    vocab: int  # the rows the top-k is taken over: the tokenizer's, not the embedding padding
    id_dtype: torch.dtype
    shard_blocks: int
    n_shards: int


def _cache_vocab(teacher, tokenizer, k: int, n: int) -> int:
    """The vocabulary size the cache covers, once k and the block count are known to be usable."""
    rows = teacher.get_output_embeddings().weight.shape[0]
    vocab = min(rows, len(tokenizer))
    if not 0 < k <= vocab:
        raise UserError(f"cache top-k must be between 1 and the vocabulary size {vocab}, got {k}")
    if n == 0:
        raise UserError("no training blocks to cache; use more text or a smaller data.seq_len")
    return vocab


def _begin_build(out: Path, fp: dict) -> dict | None:
    """The manifest when the cache in `out` is complete already; else None, with the build in
    progress recorded (a fresh one) or checked against this run (an interrupted one)."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).is_file():
        manifest = json.loads((out / MANIFEST).read_text())
        check_fingerprint(manifest["fingerprint"], fp, out)
        log.info("teacher cache %s is complete already", out)
        return manifest
    state = out / BUILD_STATE
    if state.is_file():
        check_fingerprint(json.loads(state.read_text())["fingerprint"], fp, out)
    else:
        write_json(state, {"fingerprint": fp})
    return None


def _write_shard(teacher, part: torch.Tensor, layout: _Layout, batch_size: int, path: Path) -> None:
    from safetensors.torch import save_file

    vals, ids = [], []
    for i in range(0, len(part), batch_size):
        v, j = teacher_topk(teacher, part[i : i + batch_size, :-1], layout.k, layout.vocab)
        vals.append(v.half())
        ids.append(j.to(layout.id_dtype))
    tensors = {
        "tokens": part.to(layout.id_dtype).contiguous(),
        "topk_ids": torch.cat(ids).contiguous(),
        "topk_logprobs": torch.cat(vals).contiguous(),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def _write_shards(
    teacher,
    blocks: torch.Tensor,
    out: Path,
    layout: _Layout,
    batch_size: int,
    progress: bool,
    stop_after_shards: int | None,
) -> None:
    """Every shard not on disk yet, in order."""
    from tqdm.auto import tqdm

    built = 0
    bar = tqdm(total=layout.n_shards, desc="teacher cache", unit="shard", disable=not progress)
    for s in range(layout.n_shards):
        bar.update(1)
        path = out / _shard_name(s)
        if path.is_file():
            continue  # written whole by an earlier, interrupted build
        if stop_after_shards is not None and built >= stop_after_shards:
            raise KeyboardInterrupt(f"stopped after {built} shards (test hook)")
        part = blocks[s * layout.shard_blocks : (s + 1) * layout.shard_blocks]
        _write_shard(teacher, part, layout, batch_size, path)
        built += 1
    bar.close()


def _manifest(fp: dict, out: Path, blocks: torch.Tensor, layout: _Layout, seconds: float) -> dict:
    n, width = blocks.shape
    seq_len = width - 1
    shard_bytes = sum((out / _shard_name(s)).stat().st_size for s in range(layout.n_shards))
    return {
        "fingerprint": fp,
        "blocks": n,
        "seq_len": seq_len,
        "k": layout.k,
        "vocab": layout.vocab,
        "shard_blocks": layout.shard_blocks,
        "shards": [_shard_name(s) for s in range(layout.n_shards)],
        "id_dtype": str(layout.id_dtype).removeprefix("torch."),
        "logprob_dtype": "float16",
        "bytes": shard_bytes,
        # per position a loss is computed on (n * seq_len), the input token included
        "bytes_per_token": shard_bytes / (n * seq_len),
        "build_seconds": round(seconds, 2),  # this invocation only (resumed builds: the remainder)
    }


def build_cache(
    teacher,
    tokenizer,
    blocks: torch.Tensor,
    out_dir: str | os.PathLike,
    k: int,
    teacher_id: str,
    batch_size: int = 4,
    shard_blocks: int = 64,
    progress: bool = False,
    stop_after_shards: int | None = None,
) -> dict:
    """Run `teacher` over packed `blocks` [n, L+1] and store its top-k in `out_dir`.

    `teacher_id` is `teacher_digest(...)` of the loaded teacher. Returns the manifest (with
    `bytes_per_token` and `build_seconds`). Rerunning after an interruption keeps the shards
    already written; `stop_after_shards` exists so tests can interrupt a build deterministically.
    """
    out = Path(out_dir)
    n, width = blocks.shape
    vocab = _cache_vocab(teacher, tokenizer, k, n)
    fp = fingerprint(teacher_id, vocab_digest(tokenizer), data_digest(blocks), k, width - 1)
    if (manifest := _begin_build(out, fp)) is not None:
        return manifest
    layout = _Layout(k, vocab, _id_dtype(vocab), shard_blocks, (n + shard_blocks - 1) // shard_blocks)
    teacher.eval()
    t0 = time.perf_counter()
    _write_shards(teacher, blocks, out, layout, batch_size, progress, stop_after_shards)
    manifest = _manifest(fp, out, blocks, layout, time.perf_counter() - t0)
    write_json(out / MANIFEST, manifest)
    (out / BUILD_STATE).unlink(missing_ok=True)
    return manifest


# ---------------------------------------------------------------------------- reading


class TeacherCache:
    """A finished cache, read lazily shard by shard (memory-mapped by safetensors)."""

    def __init__(self, cache_dir: str | os.PathLike, expect: dict | None = None):
        from safetensors import safe_open

        self.dir = Path(cache_dir)
        mf = self.dir / MANIFEST
        if not mf.is_file():
            if (self.dir / BUILD_STATE).is_file():
                raise UserError(
                    f"teacher cache {self.dir} is incomplete (its build was interrupted); "
                    "rerun `toolchain distill-cache` with the same settings to finish it"
                )
            raise UserError(
                f"{self.dir} is not a teacher cache (no {MANIFEST}); build one with `toolchain distill-cache`"
            )
        self.manifest = json.loads(mf.read_text())
        if expect is not None:
            check_fingerprint(self.manifest["fingerprint"], expect, self.dir)
        self.n = self.manifest["blocks"]
        self.shard_blocks = self.manifest["shard_blocks"]
        self._files = [safe_open(str(self.dir / s), framework="pt") for s in self.manifest["shards"]]

    def __len__(self) -> int:
        return self.n

    def block(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens [L+1] long, topk ids [L, k] long, topk log-probs [L, k] fp32) of block i."""
        s, r = divmod(int(i), self.shard_blocks)
        f = self._files[s]
        tok = f.get_slice("tokens")[r : r + 1][0]
        ids = f.get_slice("topk_ids")[r : r + 1][0]
        lp = f.get_slice("topk_logprobs")[r : r + 1][0]
        return tok.long(), ids.long(), lp.float()

    def batch(self, indices) -> Batch:
        parts = [self.block(i) for i in indices]
        tokens = torch.stack([p[0] for p in parts])
        b = Batch.from_blocks(tokens)
        b.teacher_topk_ids = torch.stack([p[1] for p in parts])
        b.teacher_topk_logprobs = torch.stack([p[2] for p in parts])
        return b

    def blocks(self) -> torch.Tensor:
        return torch.stack([self.block(i)[0] for i in range(self.n)])


def cache_batch_fn(cache: TeacherCache, batch_size: int, seed: int):
    """`batch_fn(step) -> Batch` for the training loop, with the teacher's top-k attached."""
    if len(cache) < batch_size:
        raise UserError(f"the teacher cache holds {len(cache)} blocks, fewer than distill.batch_size={batch_size}")

    def batch_fn(step: int) -> Batch:
        return cache.batch(batch_indices(step, batch_size, len(cache), seed).tolist())

    return batch_fn
