"""Bootstrap confidence intervals over per-document scores (numpy only).

Accuracy on a benchmark is a mean of per-document 0/1 scores, so its uncertainty comes from
which documents were drawn. Comparisons between variants (teacher vs quantized vs adapter) are
*paired*: every variant answered the same documents, so we resample document indices once and
apply them to all variants, which cancels the per-document difficulty that unpaired intervals
would count twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from recover_lora.errors import RecoverLoraError

DEFAULT_BOOTSTRAP_SAMPLES = 2000
DEFAULT_SEED = 1234


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided percentile-bootstrap interval."""

    value: float
    low: float
    high: float

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high

    def as_list(self) -> list[float]:
        return [self.low, self.high]


def _resample_indices(n_docs: int, n_samples: int, seed: int) -> np.ndarray:
    if n_docs <= 0:
        raise RecoverLoraError("cannot bootstrap over zero documents; run the evaluation with --limit >= 1")
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_docs, size=(n_samples, n_docs))


def _percentile_interval(point: float, draws: np.ndarray, confidence: float) -> Interval:
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return Interval(point, float("nan"), float("nan"))
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Interval(float(point), float(low), float(high))


def mean_ci(
    scores, n_samples: int = DEFAULT_BOOTSTRAP_SAMPLES, confidence: float = 0.95, seed: int = DEFAULT_SEED
) -> Interval:
    """Mean of per-document scores with a percentile-bootstrap interval.

    Example:
        mean_ci([1, 0, 1, 1]).value  # 0.75
    """
    scores = np.asarray(scores, dtype=np.float64)
    idx = _resample_indices(scores.size, n_samples, seed)
    return _percentile_interval(scores.mean(), scores[idx].mean(axis=1), confidence)


def paired_difference_ci(
    a, b, n_samples: int = DEFAULT_BOOTSTRAP_SAMPLES, confidence: float = 0.95, seed: int = DEFAULT_SEED
) -> Interval:
    """mean(a) - mean(b) over the same documents, resampling documents jointly."""
    a, b = _paired_arrays(a, b)
    idx = _resample_indices(a.size, n_samples, seed)
    return _percentile_interval(a.mean() - b.mean(), a[idx].mean(axis=1) - b[idx].mean(axis=1), confidence)


def recovery_ci(
    teacher,
    quantized,
    recovered,
    n_samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
    confidence: float = 0.95,
    seed: int = DEFAULT_SEED,
) -> Interval:
    """Recovery = (acc_recovered - acc_quantized) / (acc_teacher - acc_quantized), paired bootstrap.

    The point value is nan when the teacher and the quantized model score the same (nothing to
    recover); resamples where the gap is zero are dropped from the interval for the same reason.

    Example:
        recovery_ci([1, 1, 1, 1], [0, 0, 1, 1], [1, 0, 1, 1]).value  # 0.5
    """
    t, q = _paired_arrays(teacher, quantized)
    _, r = _paired_arrays(teacher, recovered)
    idx = _resample_indices(t.size, n_samples, seed)
    t_draws, q_draws, r_draws = t[idx].mean(axis=1), q[idx].mean(axis=1), r[idx].mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        gap_draws = t_draws - q_draws
        draws = np.where(gap_draws != 0, (r_draws - q_draws) / gap_draws, np.nan)
    gap = t.mean() - q.mean()
    point = (r.mean() - q.mean()) / gap if gap != 0 else float("nan")
    return _percentile_interval(point, draws, confidence)


def _paired_arrays(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise RecoverLoraError(f"paired scores must be two equal-length lists, got shapes {a.shape} and {b.shape}")
    return a, b


def macro_recovery_ci(
    tasks: Sequence[tuple[Sequence[float], Sequence[float], Sequence[float]]],
    n_samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
    confidence: float = 0.95,
    seed: int = DEFAULT_SEED,
) -> tuple[Interval, Interval]:
    """Recovery and teacher-quantized gap of the task-averaged accuracy.

    Each task is a (teacher, quantized, recovered) triple of per-document scores; documents are
    resampled within each task (paired across the three), then accuracies averaged over tasks.
    Returns (recovery, gap).
    """
    if not tasks:
        raise RecoverLoraError("no tasks to average")
    t_draws = np.zeros(n_samples)
    q_draws = np.zeros(n_samples)
    r_draws = np.zeros(n_samples)
    t_mean = q_mean = r_mean = 0.0
    for k, (teacher, quantized, recovered) in enumerate(tasks):
        t, q = _paired_arrays(teacher, quantized)
        _, r = _paired_arrays(teacher, recovered)
        idx = _resample_indices(t.size, n_samples, seed + k)
        t_draws += t[idx].mean(axis=1)
        q_draws += q[idx].mean(axis=1)
        r_draws += r[idx].mean(axis=1)
        t_mean, q_mean, r_mean = t_mean + t.mean(), q_mean + q.mean(), r_mean + r.mean()
    n = len(tasks)
    gap_draws = (t_draws - q_draws) / n
    with np.errstate(divide="ignore", invalid="ignore"):
        draws = np.where(gap_draws != 0, (r_draws - q_draws) / n / gap_draws, np.nan)
    gap = (t_mean - q_mean) / n
    point = (r_mean - q_mean) / n / gap if gap != 0 else float("nan")
    return _percentile_interval(point, draws, confidence), _percentile_interval(gap, gap_draws, confidence)


def macro_mean_ci(
    tasks: Sequence[Sequence[float]],
    n_samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
    confidence: float = 0.95,
    seed: int = DEFAULT_SEED,
) -> Interval:
    """Task-averaged accuracy with documents resampled within each task (seeds as in
    `macro_recovery_ci`, so the draws of one variant pair with the others')."""
    if not tasks:
        raise RecoverLoraError("no tasks to average")
    draws = np.zeros(n_samples)
    point = 0.0
    for k, scores in enumerate(tasks):
        scores = np.asarray(scores, dtype=np.float64)
        draws += scores[_resample_indices(scores.size, n_samples, seed + k)].mean(axis=1)
        point += scores.mean()
    return _percentile_interval(point / len(tasks), draws / len(tasks), confidence)
