"""How sure a student is of an answer it generated (numpy only, for apps and for the toolchain alike).

An answer's confidence is the lowest probability the model gave any of its answer tokens (the
0-quantile of token probabilities; Gupta et al. 2024 find low quantiles of the token
probabilities the strongest cheap signal for deferring to a larger model), after temperature
scaling fitted on held-out data. Each generated token keeps its logit and log-sum-exp over the
vocabulary at every temperature of `T_GRID`, so a temperature can be fitted later without
keeping [tokens, vocab] logits.
"""

from __future__ import annotations

import numpy as np

# a threshold no confidence reaches: every request goes to the fallback
NEVER = 2.0
T_GRID = np.exp(np.linspace(np.log(0.25), np.log(8.0), 41))


def token_stats(logits: np.ndarray, token: int) -> list[float]:
    """[logit of `token`, lse(logits / T) for T in T_GRID]: what its probability needs at any T."""
    z = logits.astype(np.float64)
    top = float(z.max())
    lse = [top / t + float(np.log(np.exp((z - top) / t).sum())) for t in T_GRID]
    return [float(z[token]), *lse]


def token_probs(stats: list[list[float]], temperature: float) -> np.ndarray:
    """Each token's probability at `temperature` (one of T_GRID, or the nearest)."""
    i = int(np.argmin(np.abs(np.log(T_GRID) - np.log(temperature))))
    s = np.asarray(stats, dtype=np.float64).reshape(-1, 1 + len(T_GRID))
    return np.exp(s[:, 0] / T_GRID[i] - s[:, 1 + i])


def answer_confidence(
    stats: list[list[float]], stops: list[int] | None, tokens: list[int], temperature: float
) -> float:
    """Lowest probability among the answer's tokens (its stop token only when it said nothing else)."""
    if not stats:
        return 0.0
    keep = [i for i, t in enumerate(tokens) if t not in (stops or [])] or [0]
    return float(token_probs([stats[i] for i in keep], temperature).min())
