"""Paired significance of a CER difference between two systems on one test set.

Both systems decode the same utterances, so every statistic here is paired by utterance.
The corpus CER of a system is sum(errors) / sum(reference characters) over the
utterances, the same figure that stage 5 reports.

`paired_bootstrap` resamples utterances with replacement (Koehn, "Statistical
significance tests for machine translation evaluation", EMNLP 2004; Bisani and Ney,
"Bootstrap estimates for confidence intervals in ASR performance evaluation",
ICASSP 2004). Each resample draws one set of utterance indices and takes the errors
of both systems and the reference lengths from those utterances. It then recomputes
both corpus CERs, so long utterances weigh as much as they do in the reported CER. The
result contains a percentile confidence interval of the absolute difference and of the
relative change, and a two-sided p-value.

`sign_test` is the exact two-sided binomial test on the utterances where the systems'
error counts differ, with ties left out. It makes no assumption about the shape of the
differences and ignores their size, so it complements the bootstrap. The Wilcoxon
signed-rank test is not used. On ASR output most differences are zeros and small ties,
and its result then depends on how zeros and ties are treated (`zero_method`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.stats import binomtest

logger = logging.getLogger(__name__)

# Resampled utterance indices per chunk: 2 M int64 indices take 16 MiB, and the three
# gathered float64 rows 48 MiB.
_MAX_CHUNK_VALUES = 2_000_000


@dataclass(frozen=True)
class BootstrapResult:
    """Paired bootstrap of CER(b) - CER(a); rates are fractions, not percent."""

    cer_a: float
    cer_b: float
    difference: float  # cer_b - cer_a on the test set itself
    ci_low: float  # percentile interval of the resampled differences
    ci_high: float
    relative_change: float  # (cer_b - cer_a) / cer_a; nan when cer_a is 0
    relative_ci_low: float
    relative_ci_high: float
    p_value: float  # two-sided, see paired_bootstrap
    resamples: int
    confidence: float
    seed: int


@dataclass(frozen=True)
class SignTestResult:
    """Exact two-sided sign test on per-utterance error counts."""

    b_better: int  # utterances where system b has fewer errors than system a
    a_better: int  # utterances where system a has fewer errors than system b
    ties: int
    p_value: float


def _as_counts(values: Sequence[float], name: str, size: int | None = None) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one number per utterance, got an array of shape {array.shape}")
    if size is not None and array.size != size:
        raise ValueError(f"{name} has {array.size} utterances, expected {size} (the same utterances for both systems)")
    if np.any(array < 0) or not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must contain finite counts of 0 or more")
    return array


def paired_bootstrap(
    errors_a: Sequence[float],
    errors_b: Sequence[float],
    ref_lengths: Sequence[float],
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapResult:
    """Bootstrap the corpus CER difference of system b against system a over utterances.

    `errors_a[i]` and `errors_b[i]` are the S + D + I counts of utterance i, and
    `ref_lengths[i]` is its number of reference characters. Each of `resamples`
    resamples draws len(ref_lengths) utterance indices with replacement from
    `numpy.random.default_rng(seed)`, so the same inputs and seed give the same result.

    The interval is the percentile interval of the resampled differences. The p-value
    tests "no difference" by centering the resampled differences on zero: it is
    (1 + #{|d* - d| >= |d|}) / (1 + resamples), where d is the observed difference and
    d* a resampled one. Identical systems therefore get p = 1, and the smallest possible
    p-value is 1 / (1 + resamples). When every resample gives the same nonzero
    difference (a single utterance, for one), p is nan. A resample whose references are all empty has no CER
    and is left out of the interval and the p-value, with a warning.
    """
    lengths = _as_counts(ref_lengths, "ref_lengths")
    a = _as_counts(errors_a, "errors_a", lengths.size)
    b = _as_counts(errors_b, "errors_b", lengths.size)
    if lengths.size == 0:
        raise ValueError("no utterances to resample")
    if lengths.sum() == 0:
        raise ValueError("every reference is empty, so the CER is undefined")
    if resamples < 1:
        raise ValueError(f"invalid resamples {resamples}: must be 1 or more")
    if not 0 < confidence < 1:
        raise ValueError(f"invalid confidence {confidence}: must be between 0 and 1")

    total_length = lengths.sum()
    cer_a = a.sum() / total_length
    cer_b = b.sum() / total_length
    difference = cer_b - cer_a
    relative = difference / cer_a if cer_a > 0 else math.nan

    sums = _resampled_sums(np.stack([a, b, lengths]), resamples, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        resampled_a = sums[0] / sums[2]
        resampled_b = sums[1] / sums[2]
        differences = resampled_b - resampled_a
        relative_changes = differences / resampled_a
    usable = np.isfinite(differences)
    if not usable.all():
        logger.warning("%d of %d resamples contain only empty references and are left out", int((~usable).sum()), resamples)
    differences = differences[usable]

    tail = 100 * (1 - confidence) / 2
    ci_low, ci_high = np.percentile(differences, [tail, 100 - tail])
    finite_relative = relative_changes[np.isfinite(relative_changes)]
    if finite_relative.size and cer_a > 0:
        relative_low, relative_high = np.percentile(finite_relative, [tail, 100 - tail])
    else:
        relative_low = relative_high = math.nan

    # The same tolerance keeps float rounding of equal sums from counting as a difference.
    extreme = np.abs(differences - difference) >= abs(difference) - 1e-12
    p_value = (1 + int(extreme.sum())) / (1 + differences.size)
    if difference != 0 and np.ptp(differences) <= 1e-12:
        # Every resample gives the same difference (a single utterance, or the same error
        # difference per character in every utterance), so resampling measures no spread.
        logger.warning("all %d resamples give the same CER difference, so the bootstrap gives no p-value", differences.size)
        p_value = math.nan
    return BootstrapResult(
        cer_a=float(cer_a), cer_b=float(cer_b), difference=float(difference),
        ci_low=float(ci_low), ci_high=float(ci_high),
        relative_change=float(relative), relative_ci_low=float(relative_low), relative_ci_high=float(relative_high),
        p_value=float(p_value), resamples=resamples, confidence=confidence, seed=seed,
    )


def _resampled_sums(columns: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Return, for each resample, the sums of every row of `columns` over resampled utterances.

    `columns` has shape (rows, utterances). The result has shape (rows, resamples). The
    draws go in chunks of resamples to bound memory, and the chunking does not change
    the numbers drawn.
    """
    rng = np.random.default_rng(seed)
    size = columns.shape[1]
    chunk = max(1, _MAX_CHUNK_VALUES // size)
    sums = np.empty((columns.shape[0], resamples))
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        indices = rng.integers(0, size, size=(stop - start, size))
        sums[:, start:stop] = columns[:, indices].sum(axis=2)
    return sums


def sign_test(errors_a: Sequence[float], errors_b: Sequence[float]) -> SignTestResult:
    """Run the exact two-sided sign test of per-utterance error counts, b against a.

    Ties are left out. With no utterance that differs, p is 1.
    """
    a = _as_counts(errors_a, "errors_a")
    b = _as_counts(errors_b, "errors_b", a.size)
    b_better = int((b < a).sum())
    a_better = int((a < b).sum())
    ties = int(a.size - b_better - a_better)
    differing = b_better + a_better
    p_value = 1.0 if differing == 0 else float(binomtest(b_better, differing, 0.5, alternative="two-sided").pvalue)
    return SignTestResult(b_better=b_better, a_better=a_better, ties=ties, p_value=p_value)
