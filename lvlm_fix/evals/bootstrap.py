"""Paired bootstrap intervals for "method minus baseline" differences.

Every metric we report is a function of column sums over samples: POPE's rates of confusion
counts summed over a split's questions, CHAIR_s = hallucinated captions / captions and
CHAIR_i = hallucinated mentions / mentions summed over images. So a sample set is an (N, K) array
of per-sample count columns plus metric functions of the column sums, and a resample is a vector
of N multiplicities: the sums of one resample are `weights @ counts`. All B resamples are one
(B, N) @ (N, K) product.

Paired: the same resample (the same questions or images, with the same multiplicities) is
applied to the baseline and to the method, and the interval is the 2.5th..97.5th percentile of
the B differences. A difference whose interval contains 0 is within noise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

DEFAULT_RESAMPLES = 1000
LEVEL = 0.95

MetricFn = Callable[[np.ndarray], np.ndarray]  # column sums (..., K) -> metric values (...)


@dataclass(frozen=True)
class SampleSet:
    """One resampling unit (a POPE split, the CHAIR images) of one method row."""

    name: str  # e.g. "gym_pope_random" or "chair"
    counts: np.ndarray  # (N, K): row i is sample i's contribution to each summed column
    metrics: Mapping[str, MetricFn]  # flat metric key (report.py) -> its formula


class Delta(BaseModel):
    """Method minus baseline for one metric, with its paired bootstrap interval."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    diff: float = Field(description="On all samples, in the metric's own unit.")
    lo: float = Field(description="2.5th percentile of the resampled differences.")
    hi: float = Field(description="97.5th percentile of the resampled differences.")

    @property
    def within_noise(self) -> bool:
        """The interval contains 0 (including a [0, 0] interval: no difference at all)."""
        return self.lo <= 0.0 <= self.hi


def resample_weights(n: int, resamples: int, seed: int) -> np.ndarray:
    """(B, N) multiplicities: how often each of the N samples is drawn in each resample."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    flat = (np.arange(resamples)[:, None] * n + draws).ravel()
    return np.bincount(flat, minlength=resamples * n).reshape(resamples, n).astype(float)


def _interval(diffs: np.ndarray) -> tuple[float, float]:
    tail = 100 * (1 - LEVEL) / 2
    lo, hi = np.percentile(diffs, [tail, 100 - tail])
    return float(lo), float(hi)


def compare(baseline: SampleSet, method: SampleSet, resamples: int, seed: int) -> dict[str, Delta]:
    """Delta per metric of `method` against `baseline` (same samples, same order)."""
    same_keys = baseline.metrics.keys() == method.metrics.keys()
    if baseline.counts.shape != method.counts.shape or not same_keys:
        raise ValueError(f"{baseline.name}: the two rows were not scored on the same samples")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    weights = resample_weights(len(baseline.counts), resamples, seed)
    base_sums, method_sums = weights @ baseline.counts, weights @ method.counts
    out = {}
    for key, metric in method.metrics.items():
        diff = metric(method.counts.sum(axis=0)) - metric(baseline.counts.sum(axis=0))
        lo, hi = _interval(metric(method_sums) - metric(base_sums))
        out[key] = Delta(diff=float(diff), lo=lo, hi=hi)
    return out


def compare_rows(
    baseline: Sequence[SampleSet], method: Sequence[SampleSet], resamples: int, seed: int
) -> dict[str, Delta]:
    """`compare` over all sample sets of two rows; each set has its own resample seed."""
    out: dict[str, Delta] = {}
    for index, (base, other) in enumerate(zip(baseline, method, strict=True)):
        if base.name != other.name:
            raise ValueError(f"sample sets differ: {base.name!r} vs {other.name!r}")
        out |= compare(base, other, resamples, seed + index)
    return out
