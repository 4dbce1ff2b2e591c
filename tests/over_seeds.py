"""Checking a prediction against measurements of several independent draws.

The analytic pass predicts a layer's variance in expectation over the draw of the weights (and of the
inputs measured); one drawn network lands around that prediction, by a few percent on the small models of
these tests. A test on one seed either has a tolerance wide enough for the unluckiest draw, and so cannot
see a bias of that size, or fails when the draws change (tests written on one seed did, when the weights'
sampler changed). These helpers measure a few seeds and check the geometric mean of measured / predicted
tightly (its spread shrinks as 1 / sqrt(seeds)) and each seed loosely.
"""

import math

import numpy as np


def geometric_mean(ratios) -> float:
    ratios = np.asarray(ratios, dtype=np.float64)
    assert np.all(ratios > 0), ratios
    return float(np.exp(np.mean(np.log(ratios))))


def assert_over_seeds(ratios, *, mean: float, each: float, what: str = ""):
    """Measured / predicted `ratios`, one per seed: their geometric mean within a factor 1 +- `mean` of 1 and
    every one within 1 +- `each` (relative tolerances; the log bounds are log(1 + tol) on both sides)."""
    ratios = np.asarray(ratios, dtype=np.float64)
    g = geometric_mean(ratios)
    label = f"{what}: " if what else ""
    assert abs(math.log(g)) <= math.log1p(mean), f"{label}geometric mean {g:.4f} over seeds {np.round(ratios, 4)}"
    worst = float(np.max(np.abs(np.log(ratios))))
    assert worst <= math.log1p(each), f"{label}a seed at {math.exp(worst):.4f}x: {np.round(ratios, 4)}"
    return g
