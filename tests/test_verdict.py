"""The verdict on GCT minus control from per-image results: the crossed seeds x images
variance, the one-seed paired variance, the rule of three, TOST equivalence, the bootstrap
for dataset-level metrics, alpha spending over sequential looks, MDE and futility."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from gct_surgery.train.verdict import (DEFAULT_RESOLUTION, FUTILITY, default_resolution,
                                       json_safe, should_stop, verdict)

DIRECTION_WORDS = ("better", "worse", "gain", "loss", "equivalent")


def _flips(rng, n: int, gains: int, losses: int, p: float = 0.75):
    """One seed of 0/100 per-image results: GCT is the control with ``gains`` wrong images
    made right and ``losses`` right images made wrong, so GCT - control is exactly known."""
    control = 100.0 * (rng.random(n) < p)
    gct = control.copy()
    wrong, right = np.flatnonzero(control == 0), np.flatnonzero(control == 100)
    gct[rng.choice(wrong, gains, replace=False)] = 100.0
    gct[rng.choice(right, losses, replace=False)] = 0.0
    return gct, control


def test_crossed_variance_and_satterthwaite_df_match_a_hand_computation():
    d = [[3.5, -0.3, 0.1, 2.0, -1.8, 0.6],
         [5.0, 1.2, 2.4, 3.9, 0.1, 3.3],
         [1.9, -2.2, -0.6, 1.1, -3.0, 0.4]]
    s, n = 3, 6
    grand = sum(sum(row) for row in d) / (s * n)
    rows = [sum(row) / n for row in d]
    cols = [sum(d[i][j] for i in range(s)) / s for j in range(n)]
    ms_seed = n * sum((r - grand) ** 2 for r in rows) / (s - 1)
    ms_image = s * sum((c - grand) ** 2 for c in cols) / (n - 1)
    ms_res = sum((d[i][j] - rows[i] - cols[j] + grand) ** 2
                 for i in range(s) for j in range(n)) / ((s - 1) * (n - 1))
    assert ms_seed > ms_res and ms_image > ms_res            # no component is clipped here
    var = (ms_seed + ms_image - ms_res) / (s * n)
    df = (ms_seed + ms_image - ms_res) ** 2 / (
        ms_seed ** 2 / (s - 1) + ms_image ** 2 / (n - 1) + ms_res ** 2 / ((s - 1) * (n - 1)))

    control = [np.zeros(n)] * s
    v = verdict([np.array(r) for r in d], control, metric="top1", higher_is_better=True)
    assert v.se ** 2 == pytest.approx(var) and v.df == pytest.approx(df)
    assert v.difference == pytest.approx(grand) and v.differences == pytest.approx(rows)
    half = stats.t.ppf(0.975, df) * math.sqrt(var)
    assert v.ci95 == pytest.approx((grand - half, grand + half))
    assert v.mde == pytest.approx((stats.t.ppf(0.975, df) + stats.t.ppf(0.8, df)) * math.sqrt(var))
    assert v.components["ms_seed"] == pytest.approx(ms_seed)
    assert "Satterthwaite" in v.method and v.stopping_rule == "fixed: one look"


def test_a_negative_component_is_clipped_so_neither_classic_analysis_is_wider():
    """Seeds that agree more than the residual suggests: the seed component would go
    negative; clipped, the variance is never below MS_image/(S N) or MS_seed/(S N)."""
    rng = np.random.default_rng(3)
    g = [100.0 * (rng.random(400) < 0.7) for _ in range(4)]
    c = [100.0 * (rng.random(400) < 0.7) for _ in range(4)]
    v = verdict(g, c, metric="top1", higher_is_better=True)
    comp = v.components
    floor = max(comp["ms_image"], comp["ms_seed"]) / (4 * 400)
    assert v.se ** 2 >= floor * (1 - 1e-12)
    assert min(comp["seed"], comp["image"]) == 0.0            # at least one was clipped


def test_one_seed_is_the_paired_mcnemar_variance_and_undetermined():
    rng = np.random.default_rng(0)
    n, b, c = 400, 30, 12                   # b images right only for GCT, c only for control
    gct, control = _flips(rng, n, b, c)
    v = verdict([gct], [control], metric="top1", higher_is_better=True, resolution=0.5)
    mcnemar = 100.0 ** 2 * ((b + c) - (b - c) ** 2 / n) / (n * (n - 1))
    assert v.se ** 2 == pytest.approx(mcnemar)
    assert v.difference == pytest.approx(100.0 * (b - c) / n) and v.df == n - 1
    assert v.conclusion == "undetermined" and v.ci95 is not None and v.mde is None
    assert v.text.startswith("undetermined: one seed; GCT +4.5 top1") and "--seeds 3" in v.text
    assert not any(w in v.text for w in DIRECTION_WORDS), v.text
    assert should_stop(v, 10)[0] is False


def test_identical_arms_give_the_rule_of_three_and_equivalence():
    rng = np.random.default_rng(1)
    n = 500
    runs = [100.0 * (rng.random(n) < 0.8) for _ in range(2)]
    v = verdict(runs, [r.copy() for r in runs], metric="top1", higher_is_better=True,
                resolution=1.0)
    assert v.difference == 0.0 and v.se == 0.0
    half90, half95 = v.ci90[1], v.ci95[1]
    assert 299 / n < half90 <= 300 / n                      # -ln(0.05)/N x 100: rule of three
    assert half95 == pytest.approx(-math.log(0.025) / n * 100)  # its two-sided 95% version
    assert v.conclusion == "equivalent" and "rule-of-three" in v.method
    assert v.text.startswith("equivalent within ±1 top1: GCT 0.0 (90% interval -0.6 to +0.6")
    assert should_stop(v, 10) == (True, "equivalent at 2 seeds")
    # a resolution below the bound cannot be reached with seeds: the floor only shrinks with N
    w = verdict(runs, runs, metric="top1", higher_is_better=True, resolution=0.5)
    assert w.conclusion == "inconclusive" and w.more_images_needed is True
    assert w.seeds_for_resolution is None and "more validation images" in w.text


def test_a_two_point_gain_is_named_and_covered():
    rng = np.random.default_rng(2)
    pairs = [_flips(rng, 5000, 400 + k, 300 - k, p=0.7) for k in (-8, -3, 0, 4, 7)]
    v = verdict([p[0] for p in pairs], [p[1] for p in pairs], metric="top1",
                higher_is_better=True, resolution=0.5)
    assert v.conclusion == "gct_better" and v.ci95[0] < 2.0 < v.ci95[1]
    assert v.ci95[0] > 0 and v.text.startswith("GCT better: +2.0 top1 (95% interval")
    assert "5 seeds x 5000 images" in v.text and "higher is better" in v.text
    assert should_stop(v, 10) == (True, "gct_better at 5 seeds")
    # the same data read the other way round is a loss
    w = verdict([p[1] for p in pairs], [p[0] for p in pairs], metric="top1",
                higher_is_better=True)
    assert w.conclusion == "control_better" and w.text.startswith("GCT worse: -2.0 top1")


def test_a_tenth_of_a_point_is_equivalent_within_half_a_point():
    rng = np.random.default_rng(4)
    pairs = [_flips(rng, 10000, 305 + k, 295 + k) for k in (-5, 0, 5, -2, 3)]
    v = verdict([p[0] for p in pairs], [p[1] for p in pairs], metric="top1",
                higher_is_better=True, resolution=default_resolution("top1"))
    assert v.difference == pytest.approx(0.1)
    assert -0.5 < v.ci90[0] and v.ci90[1] < 0.5 and v.conclusion == "equivalent"
    assert v.text.startswith("equivalent within ±0.5 top1: GCT +0.1 (90% interval -0.1 to +0.3")
    # without a resolution there is no equivalence, and the text says how to get one
    w = verdict([p[0] for p in pairs], [p[1] for p in pairs], metric="top1",
                higher_is_better=True)
    assert w.conclusion == "inconclusive" and "--resolution" in w.text
    assert "equivalence not tested" in w.method


def test_lower_is_better_names_the_lower_error_better():
    rng = np.random.default_rng(5)
    base = np.abs(rng.normal(0, 0.1, 3000))                  # per-image absolute errors
    control = [base + rng.normal(0, 0.01, 3000) for _ in range(4)]
    gct = [c - 0.01 + rng.normal(0, 0.01, 3000) for c in control]
    v = verdict(gct, control, metric="mae", higher_is_better=False,
                resolution=DEFAULT_RESOLUTION["mae"])
    assert v.difference < 0 and v.ci95[1] < 0 and v.conclusion == "gct_better"
    assert v.text.startswith("GCT better: -0.0100 mae (95% interval -0.0103 to")
    assert "lower is better" in v.text


def test_non_finite_input_is_undetermined_and_strict_json():
    g = [np.array([1.0, np.nan, 0.0]), np.array([1.0, 1.0, 0.0])]
    c = [np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, np.inf])]
    v = verdict(g, c, metric="top1", higher_is_better=True, resolution=0.5)
    assert v.conclusion == "undetermined" and "not finite" in v.text
    assert "+nan" not in v.text and "+inf" not in v.text and "GCT nan top1" in v.text
    d = v.to_dict()
    assert {"metric", "difference", "ci95", "ci90", "seeds", "conclusion", "mde", "resolution",
            "method", "stopping_rule", "looks", "text"} <= set(d)

    def no_constants(name):
        raise AssertionError(f"{name} in the JSON")
    back = json.loads(json.dumps(d, allow_nan=False), parse_constant=no_constants)
    assert back["difference"] is None and back["differences"] == [None, None]
    assert json_safe({"a": (1.0, float("inf")), "b": [np.float32("nan"), {"c": np.int64(3)}],
                      "d": np.array([0.5, -np.inf]), "e": np.bool_(True)}) == {
        "a": [1.0, None], "b": [None, {"c": 3}], "d": [0.5, None], "e": True}


def _auto(g, c, *, spent: bool, futility: bool, max_seeds: int, resolution):
    """One ``--seeds auto`` search: the verdict after each seed from 2 on."""
    for s in range(2, max_seeds + 1):
        looks = dict(looks=s - 1, max_looks=max_seeds - 1) if spent else {}
        v = verdict(g[:s], c[:s], metric="top1", higher_is_better=True,
                    resolution=resolution, **looks)
        if futility:
            if should_stop(v, max_seeds)[0]:
                return v.conclusion
        elif v.conclusion in ("gct_better", "control_better", "equivalent"):
            return v.conclusion
    return v.conclusion


def test_optional_stopping_keeps_the_false_better_rate_within_alpha():
    """No true effect: the arms differ by seed (per-run offsets) and by image (a per-image
    interaction that averages out over images, not over these 300). Testing every look at
    a fixed 5% finds a direction far too often; spending alpha keeps it under 5%."""
    rng = np.random.default_rng(7)
    sims, max_seeds, n = 400, 10, 300
    difficulty = rng.normal(1.0, 1.5, (sims, 1, n))
    interaction = rng.normal(0, 0.6, (sims, 1, n))

    def arm(sign):
        logit = difficulty + rng.normal(0, 0.25, (sims, max_seeds, 1)) + sign * interaction / 2
        return 100.0 * (rng.random((sims, max_seeds, n)) < 1 / (1 + np.exp(-logit)))
    g, c = arm(1), arm(-1)

    def false_rate(**kw):
        calls = [_auto(g[k], c[k], max_seeds=max_seeds, **kw) for k in range(sims)]
        return sum(x in ("gct_better", "control_better") for x in calls) / sims
    spent = false_rate(spent=True, futility=True, resolution=0.5)    # what --seeds auto does
    spent_all_looks = false_rate(spent=True, futility=False, resolution=None)
    naive = false_rate(spent=False, futility=False, resolution=None)
    assert spent <= 0.05 and spent_all_looks <= 0.05
    assert naive > 0.05 and naive > 2 * spent_all_looks, (spent, spent_all_looks, naive)


def test_alpha_spending_and_the_sequential_intervals():
    rng = np.random.default_rng(8)
    pairs = [_flips(rng, 2000, 120 + k, 80 - k) for k in (0, 3, -2, 5)]
    g, c = [p[0] for p in pairs], [p[1] for p in pairs]
    fixed = verdict(g, c, metric="top1", higher_is_better=True)
    looks = [verdict(g, c, metric="top1", higher_is_better=True, looks=k, max_looks=9)
             for k in range(1, 10)]
    assert sum(v.alpha_look for v in looks) == pytest.approx(0.05)
    assert all(a.alpha_look < b.alpha_look for a, b in zip(looks, looks[1:]))   # OBF shape
    assert looks[0].alpha_look < 1e-6 and looks[-1].alpha_final == looks[-1].alpha_look
    last = looks[-1]
    assert last.ci95[1] - last.ci95[0] > fixed.ci95[1] - fixed.ci95[0]
    assert "98.8% interval" in last.text and "wider than nominal" in last.method
    assert last.stopping_rule.startswith("O'Brien-Fleming alpha spending (Lan-DeMets), "
                                         "Bonferroni over looks, max 9 looks")
    with pytest.raises(ValueError, match="max_looks"):
        verdict(g, c, metric="top1", higher_is_better=True, looks=2)


def test_bootstrap_for_a_ratio_metric_covers_the_difference_and_is_reproducible():
    rng = np.random.default_rng(9)
    n = 2000

    def rows(p):                                    # per image: (hits, pixels)
        pixels = rng.integers(50, 150, n).astype(float)
        return np.stack([rng.binomial(pixels.astype(int), p), pixels], axis=1)
    ratio = lambda r: r[:, 0].sum() / r[:, 1].sum()  # noqa: E731
    g, c = [rows(0.62) for _ in range(3)], [rows(0.60) for _ in range(3)]
    v = verdict(g, c, metric="miou", higher_is_better=True, reduce=ratio, bootstrap=400)
    assert v.ci95[0] < 0.02 < v.ci95[1] and v.conclusion == "gct_better"
    assert "paired bootstrap" in v.method and "counted twice" in v.method
    again = verdict(g, c, metric="miou", higher_is_better=True, reduce=ratio, bootstrap=400)
    other = verdict(g, c, metric="miou", higher_is_better=True, reduce=ratio, bootstrap=400,
                    rng_seed=1)
    assert again.ci95 == v.ci95 and other.ci95 != v.ci95


def test_bootstrap_of_a_mean_agrees_with_the_crossed_estimate_conservatively():
    """reduce=np.mean makes the bootstrap estimate what the crossed path estimates in
    closed form; it counts the residual twice, so it is wider, but not by more than ~sqrt 2."""
    rng = np.random.default_rng(10)
    pairs = [_flips(rng, 1000, 90 + k, 60 - k) for k in (0, 6, -4)]
    g, c = [p[0] for p in pairs], [p[1] for p in pairs]
    crossed = verdict(g, c, metric="top1", higher_is_better=True)
    boot = verdict(g, c, metric="top1", higher_is_better=True, reduce=np.mean, bootstrap=600)
    assert boot.difference == pytest.approx(crossed.difference)
    assert 0.95 * crossed.se <= boot.se <= 1.6 * crossed.se


def _projected_mde(comp, s, n, a):
    """The test's own projection: expected mean squares at ``s`` seeds, Satterthwaite df."""
    res = comp["residual"]
    ms_s, ms_i = res + n * comp["seed"], res + s * comp["image"]
    num = ms_s + ms_i - res
    df = num ** 2 / (ms_s ** 2 / (s - 1) + ms_i ** 2 / (n - 1) + res ** 2 / ((s - 1) * (n - 1)))
    return (stats.t.ppf(1 - a / 2, df) + stats.t.ppf(0.8, df)) * math.sqrt(num / (s * n))


def test_seeds_for_resolution_and_when_only_more_images_help():
    rng = np.random.default_rng(11)
    # the seeds disagree a lot, the images little: more seeds help
    pairs = [_flips(rng, 20000, 600 + k, 600) for k in (-150, 120, 40)]
    v = verdict([p[0] for p in pairs], [p[1] for p in pairs], metric="top1",
                higher_is_better=True, resolution=0.5)
    k = v.seeds_for_resolution
    assert v.conclusion == "inconclusive" and v.more_images_needed is False
    assert k is not None and 3 < k <= 50 and f"about {k} seeds would resolve ±0.5" in v.text
    assert _projected_mde(v.components, k, 20000, 0.05) <= 0.5
    assert _projected_mde(v.components, k - 1, 20000, 0.05) > 0.5
    # 200 images on which the arms disagree in a fixed way: no number of seeds resolves ±0.5
    n = 200
    own = 100.0 * (rng.random(n) < 0.5)
    g = [np.where(rng.random(n) < 0.97, own, 100 - own) for _ in range(6)]
    c = [np.where(rng.random(n) < 0.97, 100 - own, own) for _ in range(6)]
    w = verdict(g, c, metric="top1", higher_is_better=True, resolution=0.5)
    assert w.seeds_for_resolution is None and w.more_images_needed is True
    assert "more seeds cannot resolve ±0.5" in w.text and "more validation images" in w.text


def test_should_stop_rules():
    rng = np.random.default_rng(12)
    pairs = [_flips(rng, 300, 30 + k, 30) for k in (-6, 5, 0)]
    g, c = [p[0] for p in pairs], [p[1] for p in pairs]
    v = verdict(g[:2], c[:2], metric="top1", higher_is_better=True, resolution=0.5,
                looks=1, max_looks=9)
    stop, why = should_stop(v, 10)        # 300 images cannot resolve ±0.5 or a direction
    assert stop and why.startswith("futility") and 0 < FUTILITY < 0.5
    assert should_stop(v, 2) == (True, "reached the maximum of 2 seeds: inconclusive")
    # a large noisy gain at 2 seeds: a call at 10 seeds is likely, so keep going
    pairs = [_flips(rng, 5000, 500 + k, 400) for k in (-40, 40)]
    w = verdict([p[0] for p in pairs], [p[1] for p in pairs], metric="top1",
                higher_is_better=True, resolution=0.5, looks=1, max_looks=9)
    assert w.conclusion == "inconclusive" and should_stop(w, 10)[1].startswith("continue")
    assert should_stop(w, 10)[0] is False


def test_defaults_and_bad_input():
    assert default_resolution("TOP1") == 0.5 and default_resolution("mae") == 0.005
    assert default_resolution("loss") is None
    with pytest.raises(ValueError, match="same images"):
        verdict([np.zeros(3)], [np.zeros(4)], metric="top1", higher_is_better=True)
    with pytest.raises(ValueError, match="per seed"):
        verdict([np.zeros(3)], [], metric="top1", higher_is_better=True)
    with pytest.raises(ValueError, match="reduce"):
        verdict([np.zeros((3, 2))], [np.zeros((3, 2))], metric="top1", higher_is_better=True)
