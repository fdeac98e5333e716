"""Confidence, temperature scaling and the fallback threshold, on answers whose logits we choose."""

import numpy as np
import pytest

from toolchain.eval.calibrate import calibrate, choose_threshold, coverage_curve, ece, fit_temperature
from toolchain.runtime.confidence import NEVER, T_GRID, answer_confidence, token_probs, token_stats


def _answer(margin: float, token: int = 0, vocab: int = 8) -> list[list[float]]:
    logits = np.zeros(vocab)
    logits[token] = margin
    return [token_stats(logits, token)]


def test_token_probability_at_any_grid_temperature():
    logits = np.array([2.0, 0.5, -1.0, 0.0])
    stats = [token_stats(logits, 1)]
    for t in (T_GRID[0], 1.0, T_GRID[-1]):
        t = float(T_GRID[np.argmin(np.abs(np.log(T_GRID) - np.log(t)))])
        z = logits / t
        expected = np.exp(z[1]) / np.exp(z).sum()
        assert token_probs(stats, t)[0] == pytest.approx(expected, rel=1e-9)


def test_answer_confidence_is_the_least_sure_token_stop_excluded():
    stats = _answer(5.0) + _answer(0.5) + _answer(-3.0, token=7)  # the last token (7) is the stop
    lowest = token_probs(stats[1:2], 1.0)[0]
    assert answer_confidence(stats, [7], [0, 0, 7], 1.0) == pytest.approx(lowest)
    assert answer_confidence(stats[2:], [7], [7], 1.0) == pytest.approx(token_probs(stats[2:], 1.0)[0])


def test_ece_and_temperature_fit_an_overconfident_model():
    rng = np.random.default_rng(0)
    # every answer says ~0.99 but only 60% are right: temperature scaling must soften it
    g = {"stats": [_answer(8.0) for _ in range(200)], "tokens": [[0]] * 200, "stops": []}
    g["right"] = (rng.random(200) < 0.6).tolist()
    conf1 = np.array([answer_confidence(s, [], [0], 1.0) for s in g["stats"]])
    t = fit_temperature(g)
    conf_t = np.array([answer_confidence(s, [], [0], t) for s in g["stats"]])
    right = np.asarray(g["right"], float)
    assert t > 1.5 and ece(conf_t, right) < ece(conf1, right) - 0.2
    assert ece(np.array([0.5, 0.5]), np.array([1.0, 0.0])) == pytest.approx(0.0)


def test_threshold_keeps_routed_accuracy_and_maximises_coverage():
    conf = np.array([0.95, 0.9, 0.8, 0.6, 0.4, 0.3])
    right = np.array([1, 1, 1, 0, 1, 0], float)
    teacher = np.array([1, 1, 1, 1, 1, 0], float)
    curve = coverage_curve(conf, right, teacher)
    assert curve[-1]["threshold"] == NEVER and curve[-1]["coverage"] == 0.0
    pick = choose_threshold(curve, teacher.mean(), 0.0)
    # answering down to 0.8 keeps the teacher's 5/6; answering 0.6 too would lose one
    assert pick["threshold"] == 0.8 and pick["coverage"] == pytest.approx(0.5)
    assert pick["routed_accuracy"] == pytest.approx(5 / 6)
    loose = choose_threshold(curve, teacher.mean(), 0.2)
    assert loose["coverage"] > pick["coverage"]


def test_calibrate_reports_the_figures(tmp_path):
    from toolchain.data.tasks import TaskExample

    ex = [
        TaskExample(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                    bucket="ab"[i % 2], answer="a", line=i)
        for i in range(20)
    ]  # fmt: skip
    g = {
        "stats": [_answer(float(i) / 4) for i in range(20)],
        "tokens": [[0]] * 20,
        "stops": [],
        "right": [i >= 6 for i in range(20)],  # the unsure answers are the wrong ones
    }
    cal = calibrate(g, [True] * 20, ex, max_drop=0.0)
    assert cal["teacher_accuracy"] == 1.0 and cal["student_accuracy"] == pytest.approx(0.7)
    assert cal["routed_accuracy"] == 1.0 and cal["coverage"] == pytest.approx(0.7)
    assert set(cal["ece_per_bucket"]) == {"a", "b"}
