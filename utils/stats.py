"""Wilson score intervals for accuracies (docs/compatibility.md section 10.2): the interval itself, the z of a two-sided
confidence level, and the line the eval-only runner prints per metric."""

import math
from statistics import NormalDist
from typing import List, Tuple


def z_for_confidence(confidence: float) -> float:
    """z of a two-sided normal interval: 0.95 -> 1.959964, 0.90 -> 1.644854, 0.99 -> 2.575829.

    Exact normal quantile for every level (the fork's helper approximated levels other than 0.90 / 0.95 with a
    z off by a factor of sqrt(2), docs/compatibility.md section 12, item 16)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(p_hat: float, n: int, z: float = 1.959964) -> Tuple[float, float]:
    """Wilson score interval (lo, hi) for an observed success rate `p_hat` over `n` trials, clipped to [0, 1].

    n <= 0 gives (nan, nan): no trials, no interval."""
    if n <= 0:
        return math.nan, math.nan
    z2_n = z * z / n
    center = (p_hat + z2_n / 2) / (1 + z2_n)
    half = z * math.sqrt(p_hat * (1 - p_hat) / n + z2_n / (4 * n)) / (1 + z2_n)
    return max(0.0, center - half), min(1.0, center + half)


def format_wilson_line(name: str, p: float, lo: float, hi: float, n: int, confidence: float = 0.95) -> str:
    """How the eval-only runner (and the quick start after it) states a measured rate: the value measured, then
    its Wilson interval (lo, hi) over the n scored, in percent with 2 decimals:

      <name> p% (95% Wilson CI [lo%, hi%], N=n)

    The interval's midpoint is not the measured value (the Wilson interval leans towards 50%), so it is not shown."""
    return f"  {name} {100 * p:.2f}% ({100 * confidence:g}% Wilson CI [{100 * lo:.2f}%, {100 * hi:.2f}%], N={n})"
