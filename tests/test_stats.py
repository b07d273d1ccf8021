"""Bootstrap confidence intervals against the normal-theory interval on a large sample."""

import math

import numpy as np

from prefalign.stats import bootstrap_ci


def test_bootstrap_ci_matches_normal_theory_for_large_samples():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=4000)
    ci = bootstrap_ci(x, seed=1)
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert abs(ci.mean - x.mean()) < 1e-12
    assert abs((ci.high - ci.low) / 2 - half) / half < 0.1
    assert ci.low < ci.mean < ci.high and ci.n == 4000


def test_nans_are_dropped_and_empty_is_nan():
    ci = bootstrap_ci([1.0, float("nan"), 3.0])
    assert ci.n == 2 and ci.mean == 2.0
    assert math.isnan(bootstrap_ci([]).mean)
    assert str(bootstrap_ci([1.0, 1.0])) == "1.000 [1.000, 1.000]"
