"""verification.judge on crafted window sequences, and its distributions against exact sums."""

from __future__ import annotations

import math

import pytest

from remediator import histogram
from remediator.verification import (DID_NOT_HELP, HELPED, INCONCLUSIVE, PeriodCounts, beta_quantile, binomial_cdf,
                                     binomial_sf, count_over, judge, regularized_beta, threshold_boundary_ns)


def period(*windows: tuple[int, int]) -> PeriodCounts:
    return PeriodCounts(tuple(windows))


def exact_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


@pytest.mark.parametrize("k, n, p", [(0, 16, 0.5), (3, 10, 0.5), (40, 100, 0.45), (480, 1000, 0.5), (5, 200, 0.01), (199, 200, 0.9)])
def test_the_binomial_tails_match_exact_sums(k, n, p):
    assert binomial_cdf(k, n, p) == pytest.approx(exact_cdf(k, n, p), rel=1e-9, abs=1e-15)
    assert binomial_sf(k, n, p) == pytest.approx(1 - exact_cdf(k - 1, n, p), rel=1e-9, abs=1e-12)


def test_the_beta_quantile_inverts_the_incomplete_beta():
    for q, a, b in [(0.05, 3.0, 8.0), (0.95, 120.5, 40.25), (0.5, 50_000.0, 60_000.0)]:
        assert regularized_beta(beta_quantile(q, a, b), a, b) == pytest.approx(q, abs=1e-9)


def test_clear_help():
    verdict = judge(period(*[(1000, 40)] * 5), period(*[(1000, 2)] * 5), 2000)
    assert verdict.verdict == HELPED
    assert verdict.ratio == pytest.approx(0.05) and verdict.ratio_high < 0.1 and verdict.p_reduced < 1e-20


def test_clear_no_help():
    before = period((1000, 42), (1000, 38), (1000, 40), (1000, 41), (1000, 39))
    after = period((1000, 42), (1000, 38), (1000, 55), (1000, 35), (1000, 45))
    verdict = judge(before, after, 2000)
    assert verdict.verdict == DID_NOT_HELP and verdict.ratio_low > 0.8 and verdict.p_not_relevant < 0.05


def test_a_ten_percent_change_within_the_noise_is_inconclusive():
    noisy = [30, 50, 20, 60, 40]
    verdict = judge(period(*[(1000, k) for k in noisy]), period(*[(1000, round(k * 0.9)) for k in noisy]), 2000)
    assert verdict.verdict == INCONCLUSIVE and "within the noise" in verdict.reason
    assert verdict.dispersion > 3  # the windows spread far more than chance: the interval widens with it
    assert verdict.ratio_low < 0.8 < 1.0 < verdict.ratio_high


def test_the_same_ten_percent_with_steady_windows_is_still_no_help():
    """A steady rate measured on many waits: the 10% fall is real but too small to call help."""
    verdict = judge(period(*[(100_000, 4000)] * 5), period(*[(100_000, 3600)] * 5), 2000)
    assert verdict.verdict == DID_NOT_HELP and verdict.p_reduced < 0.05


def test_few_waits_are_inconclusive():
    verdict = judge(period((10, 1), (10, 1), (10, 0), (10, 1), (10, 1)), period((10, 0), (10, 1), (10, 0), (10, 1), (10, 0)), 2000)
    assert verdict.verdict == INCONCLUSIVE


def test_one_window_cannot_show_its_noise():
    verdict = judge(period((1000, 40)), period(*[(1000, 0)] * 5), 2000)
    assert verdict.verdict == INCONCLUSIVE and "need 2" in verdict.reason


def test_no_wait_over_the_threshold_before_is_inconclusive():
    assert judge(period((1000, 0), (1000, 0)), period((1000, 0), (1000, 0)), 2000).verdict == INCONCLUSIVE


def test_waits_are_counted_over_the_nearest_bucket_boundary():
    boundary = threshold_boundary_ns(2000)
    assert abs(boundary - 2_000_000) <= 2_000_000 * 0.04
    counts = histogram.from_values([50_000] * 100 + [boundary] * 3 + [boundary - 70_000] * 2)
    assert count_over(counts, boundary) == (105, 3)
    assert count_over(None, boundary) == (0, 0)


def test_the_evidence_is_json_friendly():
    data = judge(period(*[(1000, 40)] * 3), period(*[(1000, 40)] * 3), 2000).to_json()
    assert data["before"] == {"windows": 3, "waits": 3000, "over": 120, "rate": 0.04}
    assert data["verdict"] in (HELPED, DID_NOT_HELP, INCONCLUSIVE) and len(data["rate_ratio_interval"]) == 2
