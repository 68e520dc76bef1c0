import numpy as np
import pytest

from ppd.eval.judge import (
    JudgeQuery,
    consistent_verdict,
    judge_pairs,
    oracle_judge,
    parse_answer,
    parse_reasoned_answer,
)
from ppd.eval.stats import bootstrap_mean, spearman, win_outcomes, win_rate


def test_win_rate_counts_ties_half():
    # 3 wins, 1 tie, 1 loss out of 5 -> (3 + 0.5) / 5 = 0.7
    est = win_rate(np.array([2, 3, 5, 1, 0]), np.array([1, 1, 4, 1, 9]))
    assert est.value == pytest.approx(0.7)
    assert est.n == 5
    assert list(win_outcomes([1, 2], [2, 2])) == [0.0, 0.5]


def test_scores_a_few_pixels_apart_are_a_tie():
    # 3 grey levels in one pixel of a 32 x 32 image: float noise of re-batching, not a preference
    pixel_noise = 3 / 255 / (32 * 32)
    assert list(win_outcomes([0.5 + pixel_noise, 0.5 - pixel_noise], [0.5, 0.5])) == [0.5, 0.5]
    # a visible change (one grey level over a tenth of the image) still decides the comparison
    visible = 0.1 / 255
    assert list(win_outcomes([0.5 + visible, 0.5 - visible], [0.5, 0.5])) == [1.0, 0.0]


def test_bootstrap_interval_contains_mean_and_shrinks_with_data():
    rng = np.random.default_rng(0)
    small = bootstrap_mean(rng.random(20), seed=1)
    large = bootstrap_mean(rng.random(2000), seed=1)
    assert small.ci95[0] <= small.value <= small.ci95[1]
    assert (large.ci95[1] - large.ci95[0]) < (small.ci95[1] - small.ci95[0]) / 5
    # constant data: no spread at all
    assert bootstrap_mean(np.ones(10)).ci95 == (1.0, 1.0)


def test_grouped_bootstrap_is_wider_for_correlated_comparisons():
    # 10 users, each either always wins or always loses: per-user resampling sees 10 samples, not 1000
    outcomes = np.repeat(np.array([1, 0] * 5, float), 100)
    users = np.repeat(np.arange(10), 100)
    flat = bootstrap_mean(outcomes, seed=0)
    grouped = bootstrap_mean(outcomes, seed=0, groups=users)
    assert flat.value == grouped.value == 0.5
    assert (grouped.ci95[1] - grouped.ci95[0]) > 3 * (flat.ci95[1] - flat.ci95[0])


def test_spearman_against_hand_computed_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks x = 1..5, y = [2, 1, 4, 3, 5]: 1 - 6·Σd²/(n(n²-1)) = 1 - 6·4/120 = 0.8
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    # ties share their average rank: x ranks (1, 2.5, 2.5, 4), deviations (-1.5, 0, 0, 1.5); y ranks 1..4,
    # deviations (-1.5, -0.5, 0.5, 1.5): ρ = 4.5 / sqrt(4.5 · 5) = sqrt(0.9)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9**0.5)
    assert np.isnan(spearman([1, 2, 3], [7, 7, 7]))


def test_consistency_filter():
    assert consistent_verdict(0, 1) == 0  # a first, then a again (shown second)
    assert consistent_verdict(1, 0) == 1
    assert consistent_verdict(0, 0) is None  # always "the first one": position bias, dropped
    assert consistent_verdict(None, 1) is None


def test_parse_answer():
    assert parse_answer("Image 2") == 1
    assert parse_answer("1") == 0
    assert parse_answer("I like image 1 more than image 2") is None
    assert parse_answer("") is None


def test_parse_reasoned_answer_reads_the_final_verdict_line():
    reply = "Pair 1: Image 1 is dark, image 2 bright... User Profile: likes bright images.\nPreference: 2"
    assert parse_reasoned_answer(reply) == 1  # the reasoning names both images; the last line decides
    assert parse_reasoned_answer("Preference: 1 ... on reflection,\nPreference: [2]") == 1
    assert parse_reasoned_answer("Prediction: image 1") is None  # no verdict line: dropped, not guessed


def test_oracle_judge_and_report():
    score = {b"hi": 2.0, b"lo": 1.0, b"same": 1.0}.__getitem__
    query = lambda a, b: JudgeQuery([], [], [], [], "c", a, b)  # noqa: E731
    report = judge_pairs([query(b"hi", b"lo"), query(b"lo", b"hi"), query(b"lo", b"same")], oracle_judge(score))
    assert report.preferred == [0, 1, None]  # the tie flips with the order: dropped
    assert report.dropped == 1 and report.dropped_share == pytest.approx(1 / 3)
    assert report.accuracy([0, 1, 0]) == 1.0
    assert report.accuracy([1, 1, 0]) == 0.5
