"""Did a step help? A verdict only when the change is beyond the noise of the windows compared.

Pure: counts in, verdict out. The measure is the rate of protected waits over the policy's
threshold (counted from the wait histograms), in the settle period before a step and the same
length after it. A p99 of a few windows moves by 10% on its own, so comparing two of them with a
fixed ratio calls noise "helped"; a rate comes with a known noise.

The test: the over-threshold waits of the two periods are rare events at rates r_before and
r_after, so, given their total K, the after-count is binomial with p = R n_a / (n_b + R n_a),
R = r_after / r_before (the conditional test for two Poisson rates; exact, and fine with zeros).
Waits are not independent: a hog's burst makes many long waits at once. The spread of the
per-window counts around their period's rate measures that (Pearson dispersion, quasi-Poisson);
when it is wider than chance allows, the counts are divided by it before the test, so bursty
windows need a larger change for the same confidence.

Verdicts, from the CONFIDENCE interval of R:
- helped: the interval is all below 1 (the rate fell for real) and R itself <= 1 - RELEVANT_REDUCTION;
- did-not-help: the interval is all above 1 - RELEVANT_REDUCTION (any reduction is too small to matter);
- inconclusive otherwise (too few waits or windows, or a change within the noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from . import histogram

CONFIDENCE = 0.90  # two-sided: each verdict is a one-sided test at 5%
RELEVANT_REDUCTION = 0.2  # the over-threshold rate must fall by a fifth for "helped"
MIN_WINDOWS = 2  # per period with waits: the noise of windows cannot be measured from one
MAX_REVERIFY = 2  # an inconclusive verdict is judged again over a longer after-period this many times

HELPED = "helped"
DID_NOT_HELP = "did-not-help"
INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class PeriodCounts:
    """Protected waits of one period, window by window: (waits, waits over the threshold)."""

    windows: tuple[tuple[int, int], ...]

    @property
    def waits(self) -> int:
        return sum(n for n, _ in self.windows)

    @property
    def over(self) -> int:
        return sum(k for _, k in self.windows)

    @property
    def measured_windows(self) -> int:
        return sum(1 for n, _ in self.windows if n > 0)

    def to_json(self) -> dict:
        waits = self.waits
        return {"windows": self.measured_windows, "waits": waits, "over": self.over,
                "rate": round(self.over / waits, 6) if waits else None}


@dataclass(frozen=True)
class Verdict:
    verdict: str
    reason: str
    threshold_us: float
    before: PeriodCounts
    after: PeriodCounts
    ratio: float | None = None  # after rate / before rate
    ratio_low: float | None = None  # the CONFIDENCE interval of the ratio
    ratio_high: float | None = None
    p_reduced: float | None = None  # one-sided p-value of "the rate did not fall"
    p_not_relevant: float | None = None  # one-sided p-value of "the rate fell by RELEVANT_REDUCTION or more"
    dispersion: float = 1.0

    def to_json(self) -> dict:
        def rounded(value: float | None, digits: int = 4):
            return None if value is None or math.isinf(value) else round(value, digits)

        return {
            "verdict": self.verdict,
            "test": "over-threshold rate, after vs before (conditional Poisson rate test, dispersion-scaled)",
            "threshold_us": round(self.threshold_us, 3),
            "before": self.before.to_json(),
            "after": self.after.to_json(),
            "rate_ratio": rounded(self.ratio),
            "rate_ratio_interval": [rounded(self.ratio_low), rounded(self.ratio_high)],
            "confidence": CONFIDENCE,
            "relevant_reduction": RELEVANT_REDUCTION,
            "p_reduced": rounded(self.p_reduced, 6),
            "p_not_relevant": rounded(self.p_not_relevant, 6),
            "dispersion": round(self.dispersion, 3),
        }


# -- counting --------------------------------------------------------------------------------------

def threshold_boundary_ns(threshold_us: float) -> int:
    """The histogram bucket boundary nearest the threshold: waits are counted whole per bucket, so
    the threshold actually applied is a boundary (within half a bucket, about 3%, of the one asked)."""
    target = threshold_us * 1000.0
    low, high = histogram.slot_bounds(histogram.slot_of(int(target)))
    return low if target - low <= high - target else high


def count_over(counts: Mapping[int, int] | None, boundary_ns: int) -> tuple[int, int]:
    """(waits, waits in buckets at or above `boundary_ns`) of one window's histogram."""
    if not counts:
        return 0, 0
    total = over = 0
    for slot, count in counts.items():
        if count <= 0:
            continue
        total += count
        if histogram.slot_bounds(slot)[0] >= boundary_ns:
            over += count
    return total, over


def period_counts(histograms: Iterable[Mapping[int, int] | None], boundary_ns: int) -> PeriodCounts:
    return PeriodCounts(tuple(count_over(counts, boundary_ns) for counts in histograms))


# -- the judgement ---------------------------------------------------------------------------------

def dispersion(periods: Sequence[PeriodCounts]) -> float:
    """How much wider than Poisson the per-window over-counts spread around their period's rate
    (Pearson chi-square over degrees of freedom), at least 1."""
    chi2 = 0.0
    dof = 0
    for period in periods:
        waits, over = period.waits, period.over
        measured = [(n, k) for n, k in period.windows if n > 0]
        if not measured or over == 0:
            continue
        rate = over / waits
        chi2 += sum((k - n * rate) ** 2 / (n * rate) for n, k in measured)
        dof += len(measured) - 1
    return max(1.0, chi2 / dof) if dof > 0 else 1.0


def judge(before: PeriodCounts, after: PeriodCounts, threshold_us: float) -> Verdict:
    """Helped, did not help, or inconclusive: see the module's doc."""
    base = dict(threshold_us=threshold_us, before=before, after=after)
    for name, period in (("before", before), ("after", after)):
        if period.measured_windows < MIN_WINDOWS:
            return Verdict(INCONCLUSIVE, f"{period.measured_windows} window(s) with protected waits {name} the step "
                           f"(need {MIN_WINDOWS} to measure their noise)", **base)
    n_b, n_a = before.waits, after.waits
    if before.over == 0:
        return Verdict(INCONCLUSIVE, f"no wait over {threshold_us:g} us before the step: nothing to improve on", **base)
    phi = dispersion((before, after))
    k_b, k_a = before.over / phi, after.over / phi  # effective counts
    total = k_b + k_a
    share_if_equal = n_a / (n_a + n_b)
    relevant = 1.0 - RELEVANT_REDUCTION
    share_if_relevant = relevant * n_a / (n_b + relevant * n_a)
    p_reduced = binomial_cdf(k_a, total, share_if_equal)  # small: the after-count is low for equal rates
    p_not_relevant = binomial_sf(k_a, total, share_if_relevant)  # small: too high for a relevant reduction
    alpha = (1.0 - CONFIDENCE) / 2
    share_low = 0.0 if k_a <= 0 else beta_quantile(alpha, k_a, total - k_a + 1)
    share_high = 1.0 if k_a >= total else beta_quantile(1.0 - alpha, k_a + 1, total - k_a)

    def as_ratio(share: float) -> float:
        return math.inf if share >= 1.0 else share / (1.0 - share) * n_b / n_a

    ratio = (after.over / n_a) / (before.over / n_b)
    low, high = as_ratio(share_low), as_ratio(share_high)
    stats = dict(ratio=ratio, ratio_low=low, ratio_high=high, p_reduced=p_reduced, p_not_relevant=p_not_relevant,
                 dispersion=phi, **base)
    rates = (f"{before.over} of {n_b} waits over {threshold_us:g} us before, {after.over} of {n_a} after: "
             f"rate x{ratio:.2f} ({CONFIDENCE:.0%} interval {low:.2f}-{_bound(high)})")
    if high < 1.0 and ratio <= relevant:
        return Verdict(HELPED, rates, **stats)
    if low > relevant:
        return Verdict(DID_NOT_HELP, f"{rates}: any reduction is under {RELEVANT_REDUCTION:.0%}", **stats)
    return Verdict(INCONCLUSIVE, f"{rates}: within the noise of the windows compared", **stats)


def _bound(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.2f}"


# -- the binomial and beta distributions (real-valued counts: effective counts are) -------------------

def binomial_cdf(k: float, n: float, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), continued to real k and n through the incomplete beta."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    return regularized_beta(1.0 - p, n - k, k + 1.0)


def binomial_sf(k: float, n: float, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), likewise."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    return regularized_beta(p, k, n - k + 1.0)


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), by its continued fraction (modified Lentz), on the side where it converges fast."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(1.0 - x, b, a) / b


def _beta_fraction(x: float, a: float, b: float) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 100_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            delta = c * d
            result *= delta
        if abs(delta - 1.0) < 1e-12:
            break
    return result


def beta_quantile(q: float, a: float, b: float) -> float:
    """The x with I_x(a, b) = q (bisection: I_x is increasing in x)."""
    low, high = 0.0, 1.0
    for _ in range(100):
        middle = (low + high) / 2
        if regularized_beta(middle, a, b) < q:
            low = middle
        else:
            high = middle
        if high - low < 1e-12:
            break
    return (low + high) / 2
