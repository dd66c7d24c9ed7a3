"""The shared sampler: greedy at temperature 0, seeded draws, top-k, the documented distribution."""

from __future__ import annotations

import numpy as np
import pytest

from cellserve.model.sampling import Sampler


def test_temperature_zero_is_argmax_with_lowest_index_on_ties() -> None:
    s = Sampler(0.0, 0, seed=1)
    assert s.next_token(np.array([0.1, 3.0, -2.0, 3.0])) == 1
    assert s.next_token(np.array([5.0, 1.0])) == 0


def test_same_seed_same_sequence_different_seed_different() -> None:
    logits = np.random.default_rng(0).standard_normal((50, 256)) * 2

    def draw(seed: int) -> list[int]:
        s = Sampler(1.0, 0, seed)
        return [s.next_token(row) for row in logits]

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_top_k_never_picks_outside_the_k_largest() -> None:
    rng = np.random.default_rng(1)
    s = Sampler(2.0, 3, seed=2)
    for _ in range(300):
        row = rng.standard_normal(40)
        assert s.next_token(row) in set(np.argsort(-row)[:3].tolist())


def test_top_k_one_is_greedy() -> None:
    rng = np.random.default_rng(2)
    s = Sampler(1.5, 1, seed=9)
    for _ in range(50):
        row = rng.standard_normal(30)
        assert s.next_token(row) == int(np.argmax(row))


def test_draws_follow_the_softmax_at_temperature() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    s = Sampler(1.0, 0, seed=11)
    p = s.probabilities(logits)
    np.testing.assert_allclose(p, [0.5, 0.3, 0.15, 0.05], rtol=1e-12)
    n = 20000
    counts = np.bincount([s.next_token(logits) for _ in range(n)], minlength=4)
    sigma = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) < 5 * sigma), counts
    sharp = Sampler(0.5, 0, seed=0).probabilities(logits)
    np.testing.assert_allclose(sharp, p**2 / np.sum(p**2), rtol=1e-12)


def test_the_algorithm_is_one_uniform_draw_per_token() -> None:
    """Pins the documented algorithm so the server and offline paths cannot drift apart silently."""
    logits = np.array([1.0, 2.0, 0.5, -1.0])
    rng = np.random.default_rng(5)
    s = Sampler(0.7, 3, seed=5)
    for _ in range(20):
        z = logits / 0.7
        z[np.argsort(-z, kind="stable")[3:]] = -np.inf
        p = np.exp(z - z.max())
        p /= p.sum()
        expected = int(np.searchsorted(np.cumsum(p), rng.random(), side="right"))
        assert s.next_token(logits) == expected


@pytest.mark.parametrize(("temperature", "top_k", "match"), [(-1.0, 0, "temperature"), (float("nan"), 0, "temperature"),
                                                              (1.0, -2, "top_k")])  # fmt: skip
def test_bad_parameters_are_rejected(temperature: float, top_k: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Sampler(temperature, top_k, seed=0)


def test_non_finite_logits_are_rejected() -> None:
    with pytest.raises(ValueError, match="finite"):
        Sampler(1.0, 0, 0).next_token(np.array([0.0, np.nan]))
