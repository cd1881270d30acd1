"""Noise on every metric: 95% intervals, and the sample counts a gate would need.

- Accuracies over independent prompts: Wilson score intervals (`scipy.stats.binomtest`), which
  keep their coverage at 0/n and n/n where the normal approximation collapses to a point.
- Means over tokens (loss, KL, top-1 agreement): tokens of one text are not independent, so the
  unit is a block of 128 consecutive positions (fixed blocks, as a block bootstrap resamples).
  The interval is Student's t on the block means: a block mean averages 128 tokens and is close
  to normal, and at the block counts evals use (20-100) t keeps its 95% coverage where the
  bootstrap of the mean (scipy's BCa) measured 92-93% (tests/test_stats.py). Perplexity is
  exp(mean loss), so its interval is the loss interval mapped through exp.
- Quantiles (median, p99, max of per-token KL) have no such formula: a block-bootstrap percentile
  interval, approximate (no coverage is claimed for it; gates on quantiles should not demand
  confidence).

An evaluator returns an `Estimate` in place of a bare float; `Eval.run` splits it into the value,
its interval and its sample count (the `n` that gate sample-size advice scales)."""

from __future__ import annotations

import math
import statistics
from typing import NamedTuple

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 500
BLOCK = 128  # positions per bootstrap block


class Estimate(NamedTuple):
    value: float
    low: float
    high: float
    n: int  # independent units behind the interval: prompts, or blocks of positions
    # the per-unit values whose mean is the metric (or its log, when `log`): two results measured on
    # the same windows or prompts are compared unit by unit (`paired`)
    units: tuple[float, ...] = ()
    log: bool = False
    bounded: bool = False  # units are scores in [0, 1] (tasks, accuracies), not any small numbers

    def map(self, fn) -> Estimate:
        """The estimate of a monotone increasing function of this quantity."""
        return Estimate(fn(self.value), fn(self.low), fn(self.high), self.n)

    def exp(self) -> Estimate:
        """exp of a mean (perplexity from a mean loss), keeping the units for paired comparisons."""
        return Estimate(math.exp(self.value), math.exp(self.low), math.exp(self.high), self.n, self.units, True)


def wilson(hits: int, n: int, confidence: float = CONFIDENCE, units=()) -> Estimate:
    """Accuracy with its Wilson score interval; `units` are the per-prompt 0/1 outcomes."""
    from scipy.stats import binomtest

    if n == 0:
        return Estimate(math.nan, 0.0, 1.0, 0)
    ci = binomtest(int(hits), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return Estimate(hits / n, float(ci.low), float(ci.high), n, tuple(float(u) for u in units))


def outcomes(hits) -> Estimate:
    """Accuracy of a list of 0/1 outcomes (Wilson), keeping the outcomes as units."""
    hits = [float(h) for h in hits]
    return wilson(int(sum(hits)), len(hits), units=hits)


def samples_for_halfwidth(halfwidth: float, p: float = 0.5, confidence: float = CONFIDENCE) -> int:
    """Prompts an accuracy needs for a Wilson interval no wider than ±halfwidth (worst case p=0.5)."""
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)  # the stdlib's: no scipy at import
    return math.ceil(z * z * p * (1 - p) / halfwidth**2)


def mean_interval(
    values, confidence: float = CONFIDENCE, bounded: bool = False, span: tuple[float, float] = (0.0, 1.0)
) -> Estimate:
    """Mean of independent samples `values` (1-D) with Student's t interval. For `bounded` samples
    (scores in `span`, [0, 1], or their paired differences in [-1, 1]; the interval is clipped to
    it) the half-width is at least the rule of three's
    -ln(1 - confidence) / n (3/n at 95%): when all n agree, up to that share of the units could
    differ unseen, and a disagreement or two must not buy a narrower interval than none (t is
    anti-conservative for rare events). One sample gives no interval at all (the whole span for bounded
    ones, ±(|mean| + 1) otherwise); a NaN or infinite sample gives a NaN interval."""
    from scipy.stats import t

    x = np.asarray(values, dtype=np.float64).ravel()
    mean = float(x.mean()) if x.size else math.nan
    units = tuple(float(v) for v in x)
    if not np.isfinite(x).all():  # a broken measurement: no interval a gate could pass on
        return Estimate(mean, math.nan, math.nan, int(x.size), units, bounded=bounded)
    if x.size < 2:
        if bounded:
            return Estimate(mean, span[0], span[1], int(x.size), units, bounded=True)
        return Estimate(mean, mean - abs(mean) - 1, mean + abs(mean) + 1, int(x.size), units)
    half = 0.0 if np.ptp(x) == 0 else float(t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    if not bounded:
        return Estimate(mean, mean - half, mean + half, int(x.size), units)
    half = max(half, -math.log(1 - confidence) / x.size)
    return Estimate(mean, max(span[0], mean - half), min(span[1], mean + half), int(x.size), units, bounded=True)


def block_means(values, block: int = BLOCK):
    """Means of consecutive `block`-position blocks of each row of `values` (rows, positions); a
    short last block is dropped unless it is the only one."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    width = x.shape[1]
    if width <= block:
        return x.mean(1)
    whole = width // block * block
    return x[:, :whole].reshape(x.shape[0], -1, block).mean(2).ravel()


def block_mean(values, block: int = BLOCK, confidence: float = CONFIDENCE) -> Estimate:
    """Mean over all positions of `values` (rows, positions) with a t interval over blocks."""
    x = np.asarray(values, dtype=np.float64)
    est = mean_interval(block_means(x, block), confidence)
    exact = float(x.mean())  # the point estimate uses every position, the dropped tail included
    shift = exact - est.value
    return Estimate(exact, est.low + shift, est.high + shift, est.n, est.units)


def block_quantile(values, q: float, block: int = BLOCK, confidence: float = CONFIDENCE, seed: int = 0) -> Estimate:
    """A quantile of all positions (q=1 is the maximum) with a block-bootstrap percentile interval."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    value = float(np.quantile(x, q))
    width = x.shape[1]
    if width < 2 * block:
        blocks = x
    else:
        blocks = x[:, : width // block * block].reshape(-1, block)
    n = len(blocks)
    if n < 2:
        return Estimate(value, value, value, n)
    rng = np.random.default_rng(seed)
    stats = np.empty(RESAMPLES)
    for r in range(RESAMPLES):
        stats[r] = np.quantile(blocks[rng.integers(0, n, n)], q)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return Estimate(value, float(min(low, value)), float(max(high, value)), n)


def paired(before: Estimate, after: Estimate, confidence: float = CONFIDENCE) -> Estimate | None:
    """after - before from the unit-by-unit differences, when both were measured on the same units
    (the same windows or prompts: equal counts, both with units); None otherwise. Far tighter than
    `combine`: the noise the two share (which text, which prompt) cancels. For perplexities the
    units are log-scale, so the change is before x (exp(mean difference) - 1)."""
    if not before.units or len(before.units) != len(after.units) or before.log != after.log:
        return None
    binary = all(u in (0.0, 1.0) for u in before.units + after.units)
    bounded = (binary or (before.bounded and after.bounded)) and not after.log
    d = mean_interval(np.subtract(after.units, before.units), confidence, bounded, span=(-1.0, 1.0))
    if not after.log:
        return Estimate(after.value - before.value, d.low, d.high, d.n, bounded=bounded)
    scale = before.value
    return Estimate(after.value - before.value, scale * math.expm1(d.low), scale * math.expm1(d.high), d.n)


def combine(before: Estimate, after: Estimate) -> Estimate:
    """after - before with an interval from the two intervals' half-widths added in quadrature
    (independent errors; conservative when both ran on the same windows or prompts)."""
    d = after.value - before.value
    low = d - math.hypot(after.value - after.low, before.high - before.value)
    high = d + math.hypot(after.high - after.value, before.value - before.low)
    return Estimate(d, low, high, min(before.n, after.n))


def needed(n: int, halfwidth: float, margin: float) -> int | None:
    """Samples that shrink an interval of half-width `halfwidth` (from `n` samples) below `margin`
    (the distance from the estimate to the gate's limit); None when the estimate sits on the limit."""
    if margin <= 0 or not math.isfinite(margin) or n <= 0:
        return None
    return max(n + 1, math.ceil(n * (halfwidth / margin) ** 2))
