"""Quality of a quantized GGUF against a reference, as in llama.cpp's perplexity README.

On held-out text (pydoc topics the distillation never trains on, same split as DataConfig's
defaults) cut into chunks of `ctx` tokens, we score the second half of every chunk (the first
half is context, as llama-perplexity does) and report for each type: perplexity, its ratio to
the reference's, mean KL divergence KL(ref || type) per token, and how often the top-1 token
agrees. The reference is the F16 (or F32) GGUF when one was exported, else the torch model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def heldout_chunks(
    tokenizer,
    n_tokens: int,
    ctx: int,
    add_bos: bool,
    source: str = "pydoc",
    heldout_fraction: float = 0.1,
    seed: int = 0,
) -> list[list[int]]:
    from toolchain.data.corpus import load_documents, split_documents

    _, held = split_documents(load_documents(source), heldout_fraction, seed)
    ids: list[int] = []
    body = ctx - (1 if add_bos else 0)
    for doc in held:
        ids.extend(tokenizer(doc, add_special_tokens=False).input_ids)
        if len(ids) >= n_tokens:
            break
    chunks = []
    for start in range(0, min(len(ids), n_tokens) - body + 1, body):
        chunk = ids[start : start + body]
        chunks.append(([tokenizer.bos_token_id] if add_bos else []) + chunk)
    return chunks


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return (x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))).astype(np.float32)


@dataclass
class Scored:
    """Log-probabilities at the scored positions and the tokens that follow them."""

    logprobs: np.ndarray  # [n, vocab] float32
    targets: np.ndarray  # [n]
    # what the figures were scored with (e.g. "F16 GGUF"), set by whoever picks the reference
    label: str | None = field(default=None, compare=False, repr=False)


def _scored_positions(chunk: list[int]) -> range:
    return range(len(chunk) // 2, len(chunk) - 1)


def llama_scored(gguf_path: str | os.PathLike, chunks: list[list[int]], threads: int = 0) -> Scored:
    from toolchain.runtime.llama import open_llama

    lps, tg = [], []
    ctx = max(len(c) for c in chunks)
    with open_llama(gguf_path, n_ctx=ctx, threads=threads) as llm:
        for chunk in chunks:
            llm.reset()
            llm.eval(chunk)
            pos = _scored_positions(chunk)
            scores = np.asarray(llm.scores[pos.start : pos.stop], dtype=np.float32)
            lps.append(_log_softmax(scores))
            tg.append(np.asarray(chunk[pos.start + 1 : pos.stop + 1]))
    return Scored(np.concatenate(lps), np.concatenate(tg))


def onnx_scored(model_dir: str | os.PathLike, chunks: list[list[int]], threads: int = 0) -> Scored:
    """`llama_scored` for an ONNX export folder, run by onnxruntime."""
    from toolchain.runtime.onnx_decoder import OnnxDecoder

    dec = OnnxDecoder(Path(model_dir), threads=threads)
    lps, tg = [], []
    for chunk in chunks:
        dec.reset()
        logits = dec.forward(chunk)
        pos = _scored_positions(chunk)
        lps.append(_log_softmax(logits[pos.start : pos.stop]))
        tg.append(np.asarray(chunk[pos.start + 1 : pos.stop + 1]))
    return Scored(np.concatenate(lps), np.concatenate(tg))


def torch_scored(model, chunks: list[list[int]]) -> Scored:
    import torch

    lps, tg = [], []
    with torch.no_grad():
        for chunk in chunks:
            logits = model(torch.tensor([chunk])).logits[0].float().numpy()
            pos = _scored_positions(chunk)
            lps.append(_log_softmax(logits[pos.start : pos.stop]))
            tg.append(np.asarray(chunk[pos.start + 1 : pos.stop + 1]))
    return Scored(np.concatenate(lps), np.concatenate(tg))


def compare(ref: Scored, got: Scored) -> dict:
    v = min(ref.logprobs.shape[-1], got.logprobs.shape[-1])
    r, g = ref.logprobs[:, :v], got.logprobs[:, :v]
    idx = np.arange(len(ref.targets))
    nll_ref = -r[idx, ref.targets].astype(np.float64)
    nll = -g[idx, got.targets].astype(np.float64)
    kld = np.empty(len(idx))
    for b in range(0, len(idx), 64):  # float64 rows in blocks: a 262k vocabulary is 2 MB a row
        rb, gb = r[b : b + 64].astype(np.float64), g[b : b + 64].astype(np.float64)
        kld[b : b + 64] = (np.exp(rb) * (rb - gb)).sum(axis=-1)
    ppl_ref, ppl = float(np.exp(nll_ref.mean())), float(np.exp(nll.mean()))
    return {
        "ppl": ppl,
        "ppl_reference": ppl_ref,
        "ppl_ratio": ppl / ppl_ref,
        "mean_kld": float(kld.mean()),
        "top1_agreement": float((r.argmax(-1) == g.argmax(-1)).mean()),
        "tokens_scored": len(idx),
    }


def format_table(rows: list[dict], title: str = "") -> str:
    """A llama.cpp-perplexity-README-style table from verify results carrying `quality`."""
    lines = []
    if title:
        lines.append(title)
    lines.append(f"| {'type':<7} | {'size MB':>8} | {'PPL':>8} | {'PPL ratio':>9} | {'mean KLD':>9} | {'top-1':>6} |")
    lines.append(f"|{'-' * 9}|{'-' * 10}:|{'-' * 9}:|{'-' * 10}:|{'-' * 10}:|{'-' * 7}:|")
    for r in rows:
        q = r.get("quality") or {}
        if not q:
            continue
        size = r.get("bytes")
        lines.append(
            f"| {r['quant']:<7} | {size / 1e6 if size else float('nan'):>8.1f} | {q['ppl']:>8.3f} | "
            f"{q['ppl_ratio'] - 1:>+8.2%} | {q['mean_kld']:>9.5f} | {q['top1_agreement']:>6.1%} |"
        )
    ref = next((r["quality"].get("reference") for r in rows if r.get("quality")), None)
    if ref:
        lines.append(f"(reference: {ref}; PPL ratio and KLD against it)")
    return "\n".join(lines)


def kld_judge(chunks: list[list[int]], threads: int = 0):
    """A judge for export_gguf's importance-matrix choice: (F16 file, weighted file, plain file)
    -> each file's mean KLD to the F16 on `chunks` (llama.cpp runs all three; the F16's figures
    are computed once per file)."""
    references: dict[str, Scored] = {}

    def judge(reference: Path, weighted: Path, plain: Path) -> dict:
        if str(reference) not in references:
            references[str(reference)] = llama_scored(reference, chunks, threads)
        ref = references[str(reference)]
        w, p = (compare(ref, llama_scored(f, chunks, threads))["mean_kld"] for f in (weighted, plain))
        return {"imatrix_kld": round(w, 5), "plain_kld": round(p, 5), "tokens": len(ref.targets)}

    return judge
