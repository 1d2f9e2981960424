"""Quantiles of the Beta distribution in numpy, for the "Beta" sigma schedule (schedule.beta_sigmas).

"Beta Sampling is All You Need" (Lee et al. 2024, arXiv:2407.12173) places the steps at the
quantiles of Beta(0.6, 0.6); diffusers (use_beta_sigmas) and AUTOMATIC1111 take them from
scipy.stats.beta.ppf. The runtime has no scipy, so this inverts the regularised incomplete beta
function I_x(a, b) by bisection, summing its power series where it converges fast (x <= 1/2; above,
I_x(a, b) = 1 - I_{1-x}(b, a)):

    I_x(a, b) = x^a (1 - x)^0 / (a B(a, b)) * (1 + a * sum_n (1 - b)_n x^n / (n! (a + n)))

((1 - b)_n the rising factorial). At x <= 1/2 a term shrinks by about half, so 60 of them reach
float64's precision. For a or b above 5 its terms cancel (1e-11 at b = 30): those are refused.
"""

from __future__ import annotations

from functools import lru_cache
from math import lgamma

import numpy as np

HALVINGS = 64  # bisection of [0, 1]: 2^-64 is below float64's spacing near 1
TERMS = 80  # at most, of the series (each about half the last at x = 1/2)


def incomplete_beta(x: np.ndarray, a: float, b: float) -> np.ndarray:
    """The regularised incomplete beta function I_x(a, b) at each x in [0, 1]."""
    x = np.asarray(x, dtype=np.float64)
    out, flip = np.empty_like(x), x > 0.5  # each side summed where its series converges fast only
    out[~flip] = series(x[~flip], a, b)
    out[flip] = 1 - series(1 - x[flip], b, a)
    return out


def series(x: np.ndarray, a: float, b: float) -> np.ndarray:
    """I_x(a, b) by its power series (x <= 1/2 where it is called)."""
    term = np.ones_like(x)  # (1 - b)_n x^n / n!
    total = np.zeros_like(x)  # sum_n>=1 term / (a + n)
    for n in range(1, TERMS + 1):
        term = term * (n - b) * x / n
        total += term / (a + n)
        if n % 10 == 0 and np.all(np.abs(term) < 1e-17 * (1 / a + np.abs(total))):
            break
    with np.errstate(divide="ignore"):  # log(0) at x = 0, where I_x is 0
        front = np.exp(a * np.log(x) + lgamma(a + b) - lgamma(a) - lgamma(b))
    return front * (1 / a + total)


@lru_cache(maxsize=64)
def spaced_quantiles(steps: int, a: float, b: float) -> tuple:
    """beta_ppf at 1 - linspace(0, 1, steps), descending from 1 to 0, as the Beta schedule takes
    them; kept per step count (the bisection costs about 0.1 s)."""
    return tuple(beta_ppf(1 - np.linspace(0, 1, steps), a, b))


def beta_ppf(q: np.ndarray, a: float, b: float) -> np.ndarray:
    """The x with I_x(a, b) = q for each q in [0, 1] (scipy.stats.beta.ppf(q, a, b)); 0 and 1 exactly
    at q = 0 and 1."""
    if not (0 < a <= 5 and 0 < b <= 5):
        raise ValueError(f"Beta({a}, {b}): the series here is exact for 0 < a, b <= 5 only")
    q = np.asarray(q, dtype=np.float64)
    lo, hi = np.zeros_like(q), np.ones_like(q)
    for _ in range(HALVINGS):  # I_x rises with x
        mid = (lo + hi) / 2
        below = incomplete_beta(mid, a, b) < q
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return np.where(q <= 0, 0.0, np.where(q >= 1, 1.0, (lo + hi) / 2))
