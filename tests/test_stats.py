"""Intervals reach their nominal 95% coverage, and the helpers gates use are right."""

from __future__ import annotations

import math

import numpy as np
import pytest

from surgery.evaluate.stats import (
    Estimate,
    block_mean,
    block_quantile,
    combine,
    mean_interval,
    needed,
    paired,
    samples_for_halfwidth,
    wilson,
)

SIMULATIONS = 1000


@pytest.mark.parametrize("p", [0.3, 0.5, 0.7, 0.9])
def test_wilson_coverage(p):
    rng = np.random.default_rng(0)
    n = 45
    hits = rng.binomial(n, p, SIMULATIONS)
    covered = [wilson(int(k), n).low <= p <= wilson(int(k), n).high for k in hits]
    assert 0.93 <= np.mean(covered) <= 0.97


def test_wilson_never_undercovers_at_the_default_count():
    """Exact coverage (binomial pmf) at n=45 over p in [0.05, 0.95]: at least 93% everywhere (it
    runs above 97% only near p=0 or 1, the conservative side)."""
    from scipy.stats import binom

    n = 45
    for p in np.linspace(0.05, 0.95, 19):
        cover = sum(binom.pmf(k, n, p) for k in range(n + 1) if wilson(k, n).low <= p <= wilson(k, n).high)
        assert cover >= 0.93, (p, cover)


@pytest.mark.parametrize("blocks", [20, 60])
def test_block_mean_coverage(blocks):
    """Per-token losses from a skewed (gamma) distribution in 128-token blocks: the interval of the
    mean covers the true mean 93-97% of the time."""
    rng = np.random.default_rng(blocks)
    shape, scale = 2.0, 1.5
    covered = 0
    for _ in range(SIMULATIONS):
        est = block_mean(rng.gamma(shape, scale, (1, 128 * blocks)))
        covered += est.low <= shape * scale <= est.high
    assert 0.93 <= covered / SIMULATIONS <= 0.97


def test_block_quantile_interval_holds_the_value():
    rng = np.random.default_rng(5)
    x = rng.gamma(2.0, 1.5, (2, 128 * 20))
    for q in (0.5, 0.99, 1.0):
        est = block_quantile(x, q)
        assert est.value == pytest.approx(np.quantile(x, q)) and est.low <= est.value <= est.high and est.n == 40


def test_wilson_edges_and_width():
    assert wilson(0, 45).low == 0 and 0.05 < wilson(0, 45).high < 0.1
    assert wilson(45, 45).high == pytest.approx(1) and wilson(45, 45).value == 1
    # the default sample counts: 43 prompts keep the worst-case half-width at or below 0.15
    assert samples_for_halfwidth(0.15) == 43
    est = wilson(21, 43)
    assert (est.high - est.low) / 2 <= 0.15
    est = wilson(1, 2)  # what the demo's gate used to rest on
    assert est.high - est.low > 0.8


def test_block_mean_uses_every_position_and_blocks_for_the_interval():
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 1.0, (2, 1000))
    est = block_mean(x, block=100)
    assert est.value == pytest.approx(x.mean()) and est.n == 20 and est.low < est.value < est.high
    const = block_mean(np.full((1, 500), 2.0))
    assert const[:4] == (2.0, 2.0, 2.0, 3) and const.units == (2.0, 2.0, 2.0)
    assert block_mean(x).map(math.exp).value == pytest.approx(math.exp(x.mean()))


def test_combine_and_needed():
    d = combine(Estimate(10, 9, 11, 40), Estimate(12, 11.5, 12.5, 40))
    assert (
        d.value == 2
        and d.low == pytest.approx(2 - math.hypot(0.5, 1))
        and d.high == pytest.approx(2 + math.hypot(0.5, 1))
    )
    # an interval of half-width 0.2 from 40 samples must shrink to 0.1: four times the samples
    assert needed(40, 0.2, 0.1) == 160
    assert needed(40, 0.2, 0.0) is None


def test_paired_difference_is_tighter_than_combined():
    """Two models on the same 40 blocks: the shared noise (which text) cancels unit by unit."""
    rng = np.random.default_rng(3)
    text = rng.normal(3.0, 0.5, 40)  # per-block difficulty, shared by both models
    before = mean_interval(text + rng.normal(0, 0.01, 40)).exp()
    after = mean_interval(text + 0.02 + rng.normal(0, 0.01, 40)).exp()
    d = paired(before, after)
    c = combine(before, after)
    assert d.low > 0  # a 2% perplexity increase is certain from the pairs ...
    assert c.low < 0 < c.high  # ... and invisible without them
    assert d.value == pytest.approx(after.value - before.value)
    assert paired(before, mean_interval(text[:30]).exp()) is None  # other units: not paired


def test_bounded_intervals_stay_in_range():
    """Three recall scores: t's interval would reach below 0 (and their difference below -1)."""
    from surgery.evaluate.stats import mean_interval, paired

    before, after = mean_interval([0.0, 0.5, 0.0], bounded=True), mean_interval([1.0, 1.0, 0.0], bounded=True)
    assert 0.0 <= before.low <= before.value <= before.high <= 1.0 and before.low == 0.0
    d = paired(after, before)
    assert -1.0 <= d.low <= d.value <= d.high <= 1.0 and d.low == -1.0
    one = mean_interval([0.8], bounded=True)  # one score: no interval, but still within [0, 1]
    assert (one.low, one.high) == (0.0, 1.0)
    from surgery.evaluate.gates import scaled

    wider = scaled(mean_interval([0.9, 1.0, 1.0, 0.95], bounded=True), 0.99)  # rescaled to 99%: still in range
    assert 0.0 <= wider.low < 0.9 and wider.high == 1.0
    diff = scaled(d, 0.99)
    assert diff.low == -1.0 and diff.high <= 1.0


def test_a_broken_measurement_has_no_interval_to_pass_on():
    """A NaN sample (a diverged model) gives a NaN interval, which a confidence gate fails."""
    from surgery.evaluate.gates import evaluate_gates, parse_gate
    from surgery.evaluate.stats import mean_interval

    for bounded in (False, True):
        est = mean_interval([0.5, math.nan, 0.4], bounded=bounded)
        assert math.isnan(est.low) and math.isnan(est.high)
    after = mean_interval([0.9, math.nan, 0.95], bounded=True)
    (outcome,) = evaluate_gates(
        [parse_gate("ruler.avg@8:min=0.5,confidence=0.95")],
        None,
        {"ruler.avg@8": after.value},
        ({}, {"ruler.avg@8": after}),
    )
    assert outcome.status == "fail"


def test_small_continuous_units_get_no_rule_of_three_floor():
    """KL block means below 1 are not scores: a clear +0.001 on every block is certain."""
    from surgery.evaluate.stats import block_mean, paired

    before = block_mean(np.full((1, 16 * 128), 0.011) + np.linspace(0, 1e-3, 16 * 128)[None])
    after = block_mean(before_values := np.full((1, 16 * 128), 0.012) + np.linspace(0, 1e-3, 16 * 128)[None])
    d = paired(before, after)
    assert d.low > 0.0009 and d.high < 0.0011, (d, before_values.shape)
