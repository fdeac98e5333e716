"""Figures comparing an export's logits with the reference's, shared by the GGUF and ONNX checks."""

from __future__ import annotations

import math

import numpy as np

# the export's noise is this quantile of its logit error on the tokens that decide a choice
NOISE_QUANTILE = 0.99


def nmse(got: np.ndarray, ref: np.ndarray) -> float:
    """sum((got - ref)^2) / sum(ref^2) over the shared vocabulary (padding may differ)."""
    v = min(got.shape[-1], ref.shape[-1])
    g, r = got[..., :v].astype(np.float64), ref[..., :v].astype(np.float64)
    d = float(((g - r) ** 2).sum() / max((r**2).sum(), 1e-30))
    return math.inf if math.isnan(d) else d  # a NaN must fail, and max() would drop it


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_rows(ours: np.ndarray, ref: np.ndarray) -> tuple[float, list[bool], list[float]]:
    """(max |diff|, top-1 equal per row, KL(ref || ours) per row) for [rows, vocab] logits."""
    ours, ref = np.atleast_2d(ours), np.atleast_2d(ref)
    v = min(ours.shape[-1], ref.shape[-1])
    ours, ref = ours[:, :v], ref[:, :v]
    lp, lq = log_softmax(ref), log_softmax(ours)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    kl = np.where(np.isfinite(kl), kl, np.inf)  # a NaN row must fail the check
    d = float(np.max(np.abs(ours.astype(np.float64) - ref.astype(np.float64))))
    return (math.inf if math.isnan(d) else d), list(ours.argmax(-1) == ref.argmax(-1)), [float(k) for k in kl]


def greedy_figures(refs: list[np.ndarray], gots: list[np.ndarray]) -> dict:
    """Greedy agreement counted where the reference's choice is clear.

    refs[i], gots[i]: [steps, vocab] logits that chose prompt i's greedy tokens (last prompt
    position, then each decode step, both sides fed the reference's tokens). A correct export
    can only choose differently where the reference's top-1/top-2 margin is below twice its own
    logit error on the deciding tokens; that error is taken at its 99th percentile over all
    positions (`noise`), so such positions are near-ties, reported apart, and the agreement is
    over the rest. The free-running greedy run of an export follows the reference exactly up to
    the first choice that differs, so `greedy_prefix` needs no run of its own.
    """
    margins, errors, flips, prefixes = [], [], [], []
    for r, g in zip(refs, gots):
        v = min(r.shape[-1], g.shape[-1])
        r, g = r[:, :v].astype(np.float64), g[:, :v].astype(np.float64)
        rows = np.arange(len(r))
        top2 = np.argpartition(-r, 1, axis=-1)[:, :2]
        first = np.where(r[rows, top2[:, 0]] >= r[rows, top2[:, 1]], top2[:, 0], top2[:, 1])
        second = np.where(first == top2[:, 0], top2[:, 1], top2[:, 0])
        chosen = g.argmax(-1)
        err = np.max(np.abs(np.stack([g[rows, k] - r[rows, k] for k in (first, second, chosen)])), axis=0)
        flip = chosen != first
        margins.append(r[rows, first] - r[rows, second])
        errors.append(np.where(np.isfinite(err), err, np.inf))
        flips.append(flip)
        prefixes.append(int(np.argmax(flip)) if flip.any() else len(flip))
    margin, error, flip = np.concatenate(margins), np.concatenate(errors), np.concatenate(flips)
    noise = float(np.quantile(error, NOISE_QUANTILE)) if len(error) else 0.0
    tie = margin < 2 * noise
    decisive = ~tie
    n_dec = int(decisive.sum())
    return {
        "greedy_agreement": 1.0 - float((flip & decisive).sum()) / n_dec if n_dec else 1.0,
        "greedy_positions": len(flip),
        "greedy_decisive": n_dec,
        "decisive_flips": int((flip & decisive).sum()),
        "near_ties": int(tie.sum()),
        "near_tie_flips": int((flip & tie).sum()),
        "top1_agreement_all": 1.0 - float(flip.mean()) if len(flip) else 1.0,
        "logit_noise_p99": noise,
        "greedy_prefix_min": int(min(prefixes)) if prefixes else 0,
        "greedy_prefix_mean": float(np.mean([p / max(1, len(f)) for p, f in zip(prefixes, flips)])) if flips else 1.0,
    }
