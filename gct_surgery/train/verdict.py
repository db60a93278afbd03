"""Did the gates help? A paired difference with a 95% interval, and one sentence.

Every seed runs GCT and its control (the same recipe with the gates held at
identity), so the seeds pair up: the difference ``gct - control`` of one seed shares
the data order, augmentation and head initialisation of both runs. Over two or more
seeds the interval is Student's t over the paired differences. With one seed there is
no seed-to-seed spread to measure; for an accuracy in percent the interval is then the
binomial uncertainty of the two validation accuracies (sqrt(p(1-p)/n) each), which
leaves out the seed-to-seed spread and so is too narrow, not too wide: the text says to
run more seeds. Other metrics get no interval from one seed.

Seeds share one validation set, so their spread says nothing about how well that set
stands for new images; with a few seeds that happen to agree, the t interval can be
narrower than the set can resolve (zero wide when the differences are equal). For an
accuracy the interval is therefore never narrower than that binomial uncertainty.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom; 1.96 beyond.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
_Z95 = 1.959964


def t95(dof: int) -> float:
    """The two-sided 95% quantile of Student's t with ``dof`` degrees of freedom."""
    if dof < 1:
        raise ValueError("a t interval needs at least one degree of freedom (two seeds)")
    return _T95[dof - 1] if dof <= len(_T95) else _Z95


@dataclass(frozen=True)
class Verdict:
    """GCT minus control on one metric, over paired seeds."""

    metric: str
    higher_is_better: bool
    seeds: int
    differences: tuple[float, ...]       # gct - control, one per seed
    difference: float                    # their mean
    ci95: tuple[float, float] | None     # None: no interval can be given
    method: str                          # how the interval was made
    text: str                            # one line a person can act on

    def to_dict(self) -> dict:
        d = asdict(self)
        d["differences"] = list(self.differences)
        d["ci95"] = list(self.ci95) if self.ci95 is not None else None
        return d


def paired_verdict(gct: list[float], control: list[float], *, metric: str,
                   higher_is_better: bool, samples: int | None = None,
                   percent: bool = False) -> Verdict:
    """The verdict on ``gct[i] - control[i]`` over seeds ``i``.

    ``samples`` (validation images) and ``percent`` (the metric is an accuracy in %)
    allow the one-seed binomial interval.
    """
    if len(gct) != len(control) or not gct:
        raise ValueError("need one GCT and one control score per seed")
    diffs = tuple(float(a) - float(b) for a, b in zip(gct, control))
    n = len(diffs)
    mean = sum(diffs) / n
    # The validation set's own resolution: two accuracies on `samples` images.
    binomial = None
    if percent and samples:
        p1, p2 = (min(max(sum(v) / n / 100.0, 0.0), 1.0) for v in (gct, control))
        binomial = 100.0 * _Z95 * math.sqrt((p1 * (1 - p1) + p2 * (1 - p2)) / samples)
    ci: tuple[float, float] | None = None
    if n >= 2:
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
        half = t95(n - 1) * sd / math.sqrt(n)
        method = f"Student t over {n} paired seeds"
        if binomial is not None and binomial > half:
            half, method = binomial, method + f" (floored at the binomial uncertainty of {samples} images)"
        ci = (mean - half, mean + half)
    elif binomial is not None:
        ci, method = (mean - binomial, mean + binomial), f"binomial, one seed, {samples} images"
    else:
        method = "none: one seed"
    text = _sentence(metric, higher_is_better, n, mean, ci)
    return Verdict(metric, higher_is_better, n, diffs, mean, ci, method, text)


def _sentence(metric: str, higher_is_better: bool, seeds: int, mean: float,
              ci: tuple[float, float] | None) -> str:
    direction = "higher is better" if higher_is_better else "lower is better"
    runs = f"{seeds} seed{'s' if seeds != 1 else ''}"
    if ci is None:
        return (f"GCT {mean:+.3g} {metric} vs the same protocol without gates ({runs}, "
                f"{direction}); no interval from one seed: run --seeds 3 or more")
    interval = f"95% interval {ci[0]:+.3g} to {ci[1]:+.3g}"
    more = "; one seed leaves out seed-to-seed spread: run --seeds 3 or more" if seeds == 1 else ""
    if ci[0] <= 0 <= ci[1]:
        return (f"no difference detected at this budget: GCT {mean:+.3g} {metric} vs the same "
                f"protocol without gates ({runs}, {interval}; {direction}){more}")
    better = (mean > 0) == higher_is_better
    verb = "better" if better else "worse"
    return (f"GCT {verb}: {mean:+.3g} {metric} over the same protocol without gates ({runs}, "
            f"{interval}; {direction}){more}")
