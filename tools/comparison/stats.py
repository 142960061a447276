"""Statistics of a comparison, with scipy.stats: mean and sd over seeds; a paired difference's
mean, 95% Student-t interval and two-sided p (paired t-test); Holm's adjustment within the
primary family; the equivalence (TOST) and non-inferiority verdicts at a declared margin;
and the power of a paired t-test (noncentral t) for planning how many seeds to run.

Differences are arm minus baseline in a loss, so a negative difference is a lower (better) loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats

ALPHA = 0.05   # every test's level: two-sided difference tests, each one-sided TOST test
POWER = 0.8    # the power a seed plan aims at


def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t with `df` degrees of freedom."""
    if not 0 < p < 1 or df < 1:
        raise ValueError("t_quantile needs 0 < p < 1 and df >= 1")
    return float(stats.t.ppf(p, df))


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
    """A paired difference (a - b) over n seeds: the differences' mean and sd, the 95% CI
    [low, high] and the two-sided p of the paired t-test (H0: mean difference 0)."""

    n: int
    mean: float
    low: float = math.nan
    high: float = math.nan
    p: float = math.nan
    sd: float = math.nan
    diffs: tuple[float, ...] = ()

    def bound(self, level: float) -> tuple[float, float]:
        """The two-sided `level` interval (0.95 is [low, high]; 0.90 is TOST's)."""
        if self.n < 2:
            return math.nan, math.nan
        half = t_quantile((1 + level) / 2, self.n - 1) * self.sd / math.sqrt(self.n)
        return self.mean - half, self.mean + half

    def one_sided_p(self, value: float, alternative: str) -> float:
        """p of the one-sided t-test H1: mean difference `alternative` ('less'/'greater') than value."""
        if self.n < 2:
            return math.nan
        if self.sd == 0:   # the same difference in every seed: the test statistic is +-infinite or 0/0
            beyond = self.mean < value if alternative == "less" else self.mean > value
            return 0.0 if beyond else 1.0
        return float(stats.ttest_1samp(self.diffs, value, alternative=alternative).pvalue)


def paired_difference(a: dict[int, float], b: dict[int, float]) -> Paired:
    """a - b paired by seed over the seeds both have (NaN values left out)."""
    diffs = tuple(a[s] - b[s] for s in sorted(set(a) & set(b)) if not (math.isnan(a[s]) or math.isnan(b[s])))
    mean, sd = mean_sd(diffs)
    if len(diffs) < 2:
        return Paired(len(diffs), mean, diffs=diffs)
    if sd == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        p = float(stats.ttest_1samp(diffs, 0.0).pvalue)
    paired = Paired(len(diffs), mean, p=p, sd=sd, diffs=diffs)
    paired.low, paired.high = paired.bound(1 - ALPHA)
    return paired


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p values (NaN stays NaN and counts in the family):
    the i-th smallest p times (m - i + 1), made non-decreasing, capped at 1."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: (math.isnan(pvalues[i]), pvalues[i]))
    adjusted, running = [math.nan] * m, 0.0
    for rank, i in enumerate(order):
        if math.isnan(pvalues[i]):
            continue
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def tost_p(p: Paired, margin: float) -> float:
    """The TOST p at +-margin: the larger of the one-sided p's of H1: d > -margin and H1: d < +margin."""
    return max(p.one_sided_p(-margin, "greater"), p.one_sided_p(margin, "less"))


def equivalence(p: Paired, margin: float) -> str:
    """The equivalence verdict at +-margin:
    - 'equivalent within ±m': both one-sided tests reject at ALPHA (TOST; the 90% CI lies inside ±m);
    - 'not equivalent': the 95% CI lies entirely outside [-m, +m] (the difference is significantly
      beyond a margin, at ALPHA two-sided);
    - 'inconclusive': neither."""
    if p.n < 2:
        return f"inconclusive (n={p.n})"
    if tost_p(p, margin) < ALPHA:
        return f"equivalent within ±{margin:g}"
    if p.low > margin or p.high < -margin:
        return f"not equivalent (beyond ±{margin:g})"
    return "inconclusive"


def noninferiority(p: Paired, margin: float) -> str:
    """The non-inferiority verdict at +margin (a loss difference: higher is worse):
    - 'non-inferior': the upper 95% bound (two-sided CI) lies below +m;
    - 'inferior': the lower 95% bound lies above +m (worse by more than the margin);
    - 'inconclusive': neither."""
    if p.n < 2:
        return f"inconclusive (n={p.n})"
    if p.high < margin:
        return f"non-inferior (upper bound < +{margin:g})"
    if p.low > margin:
        return f"inferior (lower bound > +{margin:g})"
    return "inconclusive"


def difference_verdict(diff: float, p_holm: float) -> str:
    """A primary comparison's difference verdict: 'better'/'worse' only when Holm-adjusted p < ALPHA."""
    if math.isnan(p_holm):
        return "no test (n < 2)"
    if p_holm < ALPHA:
        return "better (lower loss)" if diff < 0 else "worse (higher loss)"
    return "not significant"


# --------------------------------------------------------------------------- #
# Planning seeds: power of a two-sided paired t-test (noncentral t)
# --------------------------------------------------------------------------- #

def power(effect: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """Probability that a two-sided paired t-test at `alpha` over n seeds rejects 0 when the true
    mean difference is `effect` and the paired differences' sd is `sd`: T ~ noncentral t with
    n - 1 degrees of freedom and noncentrality effect * sqrt(n) / sd."""
    if n < 2:
        return math.nan
    df, nc = n - 1, abs(effect) * math.sqrt(n) / sd
    crit = stats.t.ppf(1 - alpha / 2, df)
    far = stats.nct.cdf(-crit, df, nc)   # the wrong-sign tail; scipy can give NaN where it is ~0
    return float(stats.nct.sf(crit, df, nc) + (0.0 if math.isnan(far) else far))


def seeds_needed(effect: float, sd: float, target: float = POWER, alpha: float = ALPHA,
                 limit: int = 10_000) -> int | None:
    """The fewest seeds (>= 2) whose paired t-test reaches `target` power (None: over `limit`)."""
    for n in range(2, limit + 1):
        if power(effect, sd, n, alpha) >= target:
            return n
    return None


def sd_upper(sd: float, n: int, confidence: float = 0.8) -> float:
    """One-sided upper `confidence` bound of a normal sd estimated from n values (chi-square)."""
    return sd * math.sqrt((n - 1) / stats.chi2.ppf(1 - confidence, n - 1))
