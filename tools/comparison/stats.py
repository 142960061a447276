"""Statistics of a comparison: mean and sd over seeds, paired differences with a Student-t interval
and the smallest difference the design could have detected (power).

No scipy: the t quantile is found by bisection on a numerically integrated CDF.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t with `df` degrees of freedom, for 0.5 <= p < 1."""
    if not 0.5 <= p < 1 or df < 1:
        raise ValueError("t_quantile needs 0.5 <= p < 1 and df >= 1")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(x: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))

    def cdf(x: float, n: int = 2000) -> float:  # symmetric density: 1/2 + Simpson's rule on [0, x]
        h = x / n
        inner = sum((4 if i % 2 else 2) * density(i * h) for i in range(1, n))
        return 0.5 + h / 3 * (density(0.0) + inner + density(x))

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, 2 * hi
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_sd(values) -> tuple[float, float]:
    """Mean and sample standard deviation of the non-NaN values (NaN where undefined)."""
    values = [float(v) for v in values if not math.isnan(float(v))]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@dataclass
class Paired:
    """A paired difference over n seeds: its mean, confidence interval [low, high] and the
    smallest difference the design could detect (`detectable`, see detectable_effect)."""

    n: int
    mean: float
    low: float
    high: float
    detectable: float = math.nan

    @property
    def verdict(self) -> str:
        if self.n < 2:
            return f"no CI possible (n={self.n})"
        if self.low == self.high == 0:
            return "identical in every seed"
        if self.low <= 0 <= self.high:
            return "not significant"
        return "significantly lower" if self.high < 0 else "significantly higher"


POWER = 0.8   # the power the detectable effect is stated at


def detectable_effect(sd: float, n: int, level: float = 0.95, power: float = POWER) -> float:
    """The smallest true paired difference a two-sided paired t-test at `level` over n seeds
    finds with probability `power`, given the paired differences' sd:

        (t_{(1+level)/2, n-1} + t_{power, n-1}) * sd / sqrt(n)

    (the usual approximation: the test statistic shifted by delta * sqrt(n) / sd, the far tail
    ignored; sd is the observed one, itself uncertain with few seeds). A null result says the
    true difference is likely smaller than this. NaN for n < 2."""
    if n < 2 or math.isnan(sd):
        return math.nan
    return (t_quantile((1 + level) / 2, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)


def paired_difference(a: dict[int, float], b: dict[int, float], level: float = 0.95) -> Paired:
    """a - b paired by seed: mean +- t_{(1+level)/2, n-1} * sd / sqrt(n) over the seeds both have,
    and the detectable effect at 80% power from the same sd and n."""
    diffs = [a[s] - b[s] for s in sorted(set(a) & set(b)) if not (math.isnan(a[s]) or math.isnan(b[s]))]
    mean, sd = mean_sd(diffs)
    if len(diffs) < 2:
        return Paired(len(diffs), mean, math.nan, math.nan)
    half = t_quantile((1 + level) / 2, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return Paired(len(diffs), mean, mean - half, mean + half, detectable_effect(sd, len(diffs), level))
