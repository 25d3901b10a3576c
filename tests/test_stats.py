"""Paired bootstrap and sign test on constructed per-utterance error counts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sparlora import stats
from sparlora.stats import paired_bootstrap, sign_test


def varied_counts(size: int = 60, seed: int = 3):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 20, size)
    errors = rng.binomial(lengths, 0.4)
    return errors, lengths


def test_identical_systems():
    errors, lengths = varied_counts()

    result = paired_bootstrap(errors, errors, lengths, resamples=2000, seed=1)

    assert result.difference == 0.0
    assert result.ci_low == 0.0
    assert result.ci_high == 0.0
    assert result.p_value == 1.0
    assert result.relative_change == 0.0


def test_identical_systems_sign_test():
    errors, _ = varied_counts()

    result = sign_test(errors, errors)

    assert (result.b_better, result.a_better, result.ties) == (0, 0, 60)
    assert result.p_value == 1.0


def test_better_on_every_utterance():
    errors, lengths = varied_counts()
    errors = np.maximum(errors, 2)
    improved = errors - np.random.default_rng(7).integers(1, 3, errors.size)

    result = paired_bootstrap(errors, improved, lengths, resamples=2000, seed=1)

    assert result.difference < 0
    assert result.ci_high < 0
    assert result.relative_ci_high < 0
    assert result.p_value == pytest.approx(1 / 2001)


def test_better_on_every_utterance_sign_test():
    a = [3, 5, 2, 4, 6, 1, 2, 3, 4, 5]
    b = [2, 4, 1, 3, 5, 0, 1, 2, 3, 4]

    result = sign_test(a, b)

    assert (result.b_better, result.a_better, result.ties) == (10, 0, 0)
    assert result.p_value == pytest.approx(2 * 0.5**10)


def test_sign_test_ties_left_out():
    result = sign_test([2, 2, 3, 1, 0], [1, 2, 4, 1, 0])

    assert (result.b_better, result.a_better, result.ties) == (1, 1, 3)
    assert result.p_value == 1.0


def test_constant_difference_gives_point_interval():
    # Every utterance has 10 characters and b makes exactly 1 error fewer, so every
    # resample has CER(b) - CER(a) = -1/10.
    lengths = np.full(25, 10)
    a = np.arange(25) % 5 + 1
    b = a - 1

    result = paired_bootstrap(a, b, lengths, resamples=500, seed=0)

    assert result.difference == pytest.approx(-0.1)
    assert result.ci_low == pytest.approx(-0.1)
    assert result.ci_high == pytest.approx(-0.1)
    # No spread among the resamples, so no bootstrap p-value; the sign test still has one.
    assert math.isnan(result.p_value)
    assert sign_test(a, b).p_value == pytest.approx(2 * 0.5**25)


def test_one_utterance_has_no_p_value():
    result = paired_bootstrap([1], [2], [5], resamples=200)

    assert result.difference == pytest.approx(0.2)
    assert math.isnan(result.p_value)


def test_interval_matches_normal_approximation():
    # With equal reference lengths L, the resampled difference is the mean of n draws
    # of d_i / L, so its center is mean(d) / L and its standard deviation is
    # std(d) / (L sqrt(n)), with the population std. For n = 400 the percentile interval
    # is close to mean(d) / L +- 1.96 std(d) / (L sqrt(n)).
    rng = np.random.default_rng(11)
    size, length = 400, 20
    a = rng.integers(2, 12, size)
    d = rng.integers(-3, 2, size)
    b = np.clip(a + d, 0, None)
    d = b - a
    lengths = np.full(size, length)

    result = paired_bootstrap(a, b, lengths, resamples=20_000, seed=5)

    center = d.mean() / length
    half_width = 1.959964 * d.std() / (length * math.sqrt(size))
    assert result.difference == pytest.approx(center)
    assert (result.ci_low + result.ci_high) / 2 == pytest.approx(center, abs=0.05 * half_width)
    assert (result.ci_high - result.ci_low) / 2 == pytest.approx(half_width, rel=0.05)


def test_corpus_cer_weights_by_length():
    result = paired_bootstrap([1, 9], [0, 9], [2, 18], resamples=10, seed=0)

    assert result.cer_a == pytest.approx(10 / 20)
    assert result.cer_b == pytest.approx(9 / 20)
    assert result.difference == pytest.approx(-1 / 20)
    assert result.relative_change == pytest.approx(-0.1)


def test_same_seed_same_result():
    errors, lengths = varied_counts()
    other = np.roll(errors, 1)

    first = paired_bootstrap(errors, other, lengths, resamples=300, seed=4)
    second = paired_bootstrap(errors, other, lengths, resamples=300, seed=4)
    third = paired_bootstrap(errors, other, lengths, resamples=300, seed=5)

    assert first == second
    assert (first.ci_low, first.ci_high) != (third.ci_low, third.ci_high)


def test_chunking_keeps_draws(monkeypatch):
    errors, lengths = varied_counts()
    other = np.roll(errors, 2)
    whole = paired_bootstrap(errors, other, lengths, resamples=50, seed=9)

    monkeypatch.setattr(stats, "_MAX_CHUNK_VALUES", 7 * lengths.size)
    chunked = paired_bootstrap(errors, other, lengths, resamples=50, seed=9)

    assert chunked == whole


def test_empty_reference_resamples_left_out(caplog):
    # Two of three utterances have empty references; about (2/3)^3 of the resamples
    # draw only those and have no CER.
    result = paired_bootstrap([1, 0, 2], [0, 0, 1], [0, 0, 4], resamples=300, seed=2)

    assert "contain only empty references and are left out" in caplog.text
    assert math.isfinite(result.ci_low)
    assert result.difference == pytest.approx((1 - 3) / 4)


def test_zero_baseline_has_no_relative_change():
    result = paired_bootstrap([0, 0], [1, 0], [3, 3], resamples=100, seed=0)

    assert result.difference == pytest.approx(1 / 6)
    assert math.isnan(result.relative_change)
    assert math.isnan(result.relative_ci_low)


@pytest.mark.parametrize("a, b, lengths, message", [
    ([1, 2], [1], [3, 3], "errors_b has 1 utterances, expected 2"),
    ([1, -1], [1, 1], [3, 3], "finite counts"),
    ([], [], [], "no utterances"),
    ([1], [1], [0], "every reference is empty"),
])
def test_invalid_inputs(a, b, lengths, message):
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(a, b, lengths, resamples=10)
