"""The verdict on GCT minus control: paired t over seeds, the one-seed binomial
interval, and a sentence that says which direction is better."""
from __future__ import annotations

import math

import pytest

from gct_surgery.train.verdict import paired_verdict, t95


def test_paired_t_interval_matches_a_hand_computation():
    v = paired_verdict([80.0, 81.0, 82.5], [79.0, 80.5, 80.0], metric="top1", higher_is_better=True)
    diffs = [1.0, 0.5, 2.5]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    half = 4.303 * sd / math.sqrt(3)
    assert v.differences == tuple(diffs) and v.difference == pytest.approx(mean)
    assert v.ci95 == pytest.approx((mean - half, mean + half))
    assert v.seeds == 3 and "Student t" in v.method
    # the interval includes 0 (sd is large for three seeds): no difference detected
    assert v.ci95[0] < 0 < v.ci95[1] and v.text.startswith("no difference detected")
    assert "higher is better" in v.text and "3 seeds" in v.text


def test_a_clear_gain_and_a_clear_loss_are_named():
    gain = paired_verdict([81.0, 81.1, 81.2], [80.0, 80.0, 80.1], metric="top1", higher_is_better=True)
    assert gain.ci95[0] > 0 and gain.text.startswith("GCT better: +1.07 top1")
    loss = paired_verdict([81.0, 81.1, 81.2], [80.0, 80.0, 80.1], metric="mae", higher_is_better=False)
    assert loss.text.startswith("GCT worse") and "lower is better" in loss.text


def test_one_seed_accuracy_gets_the_binomial_interval():
    v = paired_verdict([80.0], [78.0], metric="top1", higher_is_better=True, samples=1000, percent=True)
    half = 100 * 1.959964 * math.sqrt((0.8 * 0.2 + 0.78 * 0.22) / 1000)
    assert v.ci95 == pytest.approx((2.0 - half, 2.0 + half))
    assert "binomial" in v.method and "run --seeds 3" in v.text


def test_one_seed_of_another_metric_has_no_interval():
    v = paired_verdict([0.10], [0.12], metric="mae", higher_is_better=False)
    assert v.ci95 is None and "no interval" in v.text
    assert v.to_dict()["ci95"] is None and v.to_dict()["differences"] == pytest.approx([-0.02])


def test_t_quantiles_and_bad_input():
    assert t95(1) == pytest.approx(12.706) and t95(100) == pytest.approx(1.96, abs=1e-3)
    with pytest.raises(ValueError):
        paired_verdict([1.0], [], metric="x", higher_is_better=True)


def test_seeds_that_agree_do_not_give_false_certainty():
    """Two seeds with the same difference: the t interval is zero wide, but 12 validation
    images cannot resolve 8 points; the binomial floor keeps the interval honest."""
    v = paired_verdict([33.3, 33.3], [41.7, 41.7], metric="top1", higher_is_better=True,
                       samples=12, percent=True)
    assert v.ci95[0] < 0 < v.ci95[1] and "floored" in v.method
    assert v.text.startswith("no difference detected")
    # with many images the seeds' own spread decides again
    w = paired_verdict([80.0, 81.0, 82.5], [79.0, 80.5, 80.0], metric="top1", higher_is_better=True,
                       samples=10**7, percent=True)
    assert "floored" not in w.method
