"""Did the gates help? GCT minus control over paired seeds and shared images, in one sentence.

Both arms score the same N validation images in each of S seeds; seed s of GCT pairs with
seed s of the control. The difference varies with the seed (data order, augmentation, head
init) and with the images (another N images of the kind would change it), and the interval
carries both: seeds alone look certain on 12 images that happen to agree, images alone miss
the seed spread. Pure statistics (numpy; scipy imported where a quantile is needed); the
method in plain words is docs/verdict.md.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np

DEFAULT_RESOLUTION: dict[str, float] = {"top1": 0.5, "top5": 0.5, "mae": 0.005, "max_f": 0.005,
                                        "miou": 0.5, "pixel_acc": 0.5}
POWER = 0.80                       # for the minimum detectable effect
FUTILITY = 0.10                    # stop when a call at max_seeds is less likely than this
_FAR = 1e12                        # "as many seeds as you like": the image-only limit
_GRID = np.unique(np.r_[np.arange(2, 51), np.geomspace(51, 1e6, 120).astype(int)])  # "about"


def default_resolution(metric: str) -> float | None:
    """The equivalence bound used when the user gives no --resolution (None: not tested)."""
    return DEFAULT_RESOLUTION.get(metric.lower())


def strict_json(obj, indent: int | None = 2) -> str:
    """JSON as RFC 8259 has it: a missing or non-finite number is null, never NaN."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False, default=str)


def json_safe(x):
    """``x`` with nested dicts/lists/tuples/numpy values made strict JSON (RFC 8259): a NaN or
    an infinity becomes None, tuples and arrays become lists, numpy scalars plain numbers."""
    if isinstance(x, (np.ndarray, np.generic)):
        x = x.tolist()
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """GCT minus control on one metric. ``ci95``/``ci90`` are the (1-a)/(1-2a) intervals for
    this look's alpha a: nominal 95%/90% at a single look, wider under sequential looks."""

    metric: str
    higher_is_better: bool
    seeds: int
    images: int
    differences: tuple[float, ...]      # dataset-level gct - control, one per seed
    difference: float                   # their mean
    se: float | None = None             # standard error of ``difference``
    df: float | None = None             # Satterthwaite degrees of freedom
    ci95: tuple[float, float] | None = None
    ci90: tuple[float, float] | None = None
    conclusion: str  # equivalent, gct_better, control_better, inconclusive or undetermined
    mde: float | None = None            # smallest effect found with 80% power at this SE
    resolution: float | None            # equivalence bound; None: equivalence not tested
    seeds_for_resolution: int | None = None  # seeds that bring the MDE down to ``resolution``
    more_images_needed: bool | None = None   # True: the image term alone exceeds ``resolution``
    method: str
    stopping_rule: str
    looks: int
    max_looks: int | None
    alpha: float                        # the error rate over all looks
    alpha_look: float                   # spent at this look
    alpha_final: float                  # spent at the last look (projections use it)
    components: dict = field(default_factory=dict)  # variance components (for projections)
    text: str                           # one sentence a person can act on

    def to_dict(self) -> dict:
        return json_safe(asdict(self))


@lru_cache(maxsize=256)
def _spending(alpha: float, looks: int, max_looks: int | None) -> tuple[float, float, str]:
    """(alpha at this look, alpha at the last look, rule). Lan-DeMets O'Brien-Fleming-like
    spending a(t) = 2 - 2 Phi(z_{1-alpha/2} / sqrt(t)); look k tests at the increment
    a(t_k) - a(t_{k-1}). The increments sum to alpha, so by the union bound the chance of
    any false call over all looks is at most alpha, however the looks correlate."""
    from scipy import stats  # quantiles; json_safe alone needs only numpy

    if max_looks is None and looks != 1:
        raise ValueError("looks > 1 needs max_looks: alpha is spent over a preset maximum")
    k = max_looks or 1
    if k == 1:
        return alpha, alpha, "fixed: one look"
    t = np.arange(1, k + 1) / k
    inc = np.diff(np.r_[0.0, 2 * stats.norm.sf(stats.norm.isf(alpha / 2) / np.sqrt(t))])
    a_k, a_last = float(inc[looks - 1]), float(inc[-1])
    return a_k, a_last, (f"O'Brien-Fleming alpha spending (Lan-DeMets), Bonferroni over looks, "
                         f"max {k} looks; look {looks} spends alpha {a_k:.3g}")


def _crossed(d: np.ndarray) -> dict:
    """Variance components of D[s, i] = mu + seed_s + image_i + residual (two-way ANOVA
    without replication). Each is clipped at 0: a negative estimate means 'too small to
    see', not 'negative'. So Var(mean D) is never below MS_image/(S N) (the paired per-image
    variance for these seeds) nor MS_seed/(S N) (the plain t over seed means)."""
    s, n = d.shape
    if s == 1:          # seeds and residual cannot be told apart: McNemar-type variance
        return {"kind": "crossed", "image_and_residual": float(np.var(d[0], ddof=1))}
    m, r, c = d.mean(), d.mean(1), d.mean(0)
    ms_seed = n * float(((r - m) ** 2).sum()) / (s - 1)
    ms_image = s * float(((c - m) ** 2).sum()) / (n - 1)
    ms_res = float(((d - r[:, None] - c[None, :] + m) ** 2).sum()) / ((s - 1) * (n - 1))
    return {"kind": "crossed", "seed": max(0.0, (ms_seed - ms_res) / n),
            "image": max(0.0, (ms_image - ms_res) / s), "residual": ms_res,
            "ms_seed": ms_seed, "ms_image": ms_image, "ms_residual": ms_res}


def _satterthwaite(total, *terms):
    """Degrees of freedom of a sum of mean squares: total^2 / sum(term^2 / df)."""
    den = sum(t ** 2 / df for t, df in terms)
    return np.where(den > 0, total ** 2 / np.where(den > 0, den, 1), np.inf)


def _project(comp: dict, s, n: int):
    """(Var(mean difference), Satterthwaite df) with ``s`` seeds (a number or an array)."""
    s = np.asarray(s, dtype=float)
    if "image_and_residual" in comp:                     # one seed of a mean metric
        return np.asarray(comp["image_and_residual"] / n), np.asarray(n - 1.0)
    if comp["kind"] == "crossed":
        res = comp["residual"]
        ms_s, ms_i = res + n * comp["seed"], res + s * comp["image"]   # expected mean squares
        num = ms_s + ms_i - res
        return num / (s * n), _satterthwaite(num, (ms_s, s - 1), (ms_i, n - 1),
                                             (res, (s - 1) * (n - 1)))
    img, seed = comp["image_term"], comp["seed_var"]
    if seed is None:                                     # one seed of a dataset-level metric
        return np.asarray(img), np.asarray(n - 1.0)
    return img + seed / s, _satterthwaite(img + seed / s, (img, n - 1), (seed / s, s - 1))


def _floors(comp: dict, n: int, a: float) -> tuple[float, float]:
    """Rule-of-three half-widths (for the 1-a and 1-2a intervals) when no image disagrees:
    with 0 discordant of n, -ln(q)/n bounds the discordant share one-sidedly at level 1-q
    (q = 0.05 gives 3/n); times the value scale it bounds the difference."""
    scale = comp.get("rule_of_three_scale") or 0.0  # None: an image disagrees, no floor
    return -math.log(a / 2) / n * scale, -math.log(a) / n * scale


def _seeds_needed(comp: dict, n: int, a: float, resolution: float):
    """(fewest seeds whose MDE at alpha ``a`` is within ``resolution``, whether more images
    are needed, the MDE with unlimited seeds: the image term that more seeds cannot lower)."""
    from scipy import stats  # quantiles; json_safe alone needs only numpy

    grid = np.r_[_GRID, _FAR]
    var, df = _project(comp, grid, n)
    q = stats.t.ppf([[1 - a / 2], [POWER]], df)
    mde = np.maximum((q[0] + q[1]) * np.sqrt(var), _floors(comp, n, a)[0])
    limit = float(mde[-1])
    if not limit < resolution:
        return None, True, limit
    ok = mde[:-1] <= resolution
    return (int(grid[np.argmax(ok)]) if ok.any() else None), False, limit


def _stack(gct, control, reduce) -> tuple[np.ndarray, np.ndarray]:
    if len(gct) != len(control) or len(gct) == 0:
        raise ValueError(f"need one GCT and one control array per seed ({len(gct)} and "
                         f"{len(control)})")
    both = [np.asarray(x, dtype=float) for x in (*gct, *control)]
    if len({x.shape for x in both}) != 1:
        raise ValueError(f"every seed of both arms must score the same images: shapes "
                         f"{sorted({x.shape for x in both})}")
    if reduce is None and both[0].ndim != 1:
        raise ValueError("per-image values must have shape (N,); pass reduce= for (N, K) "
                         "per-image statistics")
    if both[0].ndim == 0 or both[0].shape[0] < 2:
        raise ValueError("need at least 2 images")
    return np.stack(both[:len(gct)]), np.stack(both[len(gct):])


def _bootstrap(g: np.ndarray, c: np.ndarray, reduce, b: int, rng_seed: int) -> np.ndarray:
    """Mean over seeds of reduce(gct_s[idx]) - reduce(control_s[idx]) for ``b`` resamples
    idx of the images, the same idx for both arms and every seed (that is the pairing)."""
    s, n = g.shape[:2]
    both = np.concatenate([g, c])                 # (2S, N, ...): one take per resample
    rng, out = np.random.default_rng(rng_seed), np.empty(b)
    for k in range(b):
        x = both.take(rng.integers(0, n, n), axis=1)
        v = [reduce(x[j]) for j in range(2 * s)]
        with np.errstate(invalid="ignore"):                 # inf - inf: counted as non-finite
            out[k] = np.mean(np.subtract(v[:s], v[s:]))
    return out


def _dec(step: float, *bounds: float) -> int:
    """Decimals that show a number to about a quarter of ``step`` (an interval half-width),
    at least one, and enough that no nonzero interval bound reads as 0."""
    dec = min(8, max(1, 3 if not (math.isfinite(step) and step > 0)
                     else -math.floor(math.log10(step / 2))))
    while dec < 8 and any(x != 0 and round(x, dec) == 0 for x in bounds):
        dec += 1
    return dec


def _num(x: float, dec: int, sign: bool = True) -> str:
    if not math.isfinite(x):
        return str(float(x))                              # 'nan', 'inf', '-inf': never '+nan'
    text = f"{x:+.{dec}f}" if sign else f"{x:.{dec}f}"
    return f"{0:.{dec}f}" if float(text) == 0 else text


def _pct(a: float) -> str:
    """'95%' for a = 0.05, '98.8%' for 0.0124: two significant digits of ``a``."""
    d = max(0, 1 - math.floor(math.log10(100 * a)))
    text = f"{100 * (1 - a):.{d}f}"
    return (text.rstrip("0").rstrip(".") if "." in text else text) + "%"


def verdict(gct: Sequence[np.ndarray], control: Sequence[np.ndarray], *, metric: str,
            higher_is_better: bool, resolution: float | None = None,
            reduce: Callable[[np.ndarray], float] | None = None,
            looks: int = 1, max_looks: int | None = None, alpha: float = 0.05,
            rule_of_three_scale: float | None = None, bootstrap: int = 2000,
            rng_seed: int = 0) -> Verdict:
    """GCT minus control from per-image results: ``gct[s]``, ``control[s]`` of shape (N,)
    (the metric is their mean) or, with ``reduce``, (N, K) rows that ``reduce`` turns into
    a dataset-level metric. Seeds pair up by position; every array scores the same images.

    Mean metrics: the crossed seeds x images variance (see ``_crossed``). Dataset-level
    metrics: a paired bootstrap over images (same indices for both arms and all seeds) gives
    the image term; the seed term s_d^2/S from the per-seed differences is added. Both terms
    contain the residual, so it is counted twice: conservative. Seeds are never resampled:
    a seed bootstrap says little below 8 seeds. Intervals are t with Satterthwaite df.

    If no image differs in any seed the variance is 0, and the half-widths are floored by
    the rule of three, -ln(q)/N x scale at one-sided level q (3/N for ci90 at alpha 0.05,
    ln 40/N for ci95): scale is ``rule_of_three_scale``, else the observed per-image value
    range, else max |value| (with ``reduce``: max |metric|), else 1.

    Conclusions, a = this look's alpha: one seed or a non-finite value -> undetermined;
    ci90 (1-2a) inside ±resolution -> equivalent (TOST; wins over a direction); ci95 (1-a)
    excluding 0 -> gct_better / control_better; else inconclusive.
    """
    from scipy import stats  # quantiles; json_safe alone needs only numpy

    g, c = _stack(gct, control, reduce)
    s, n = g.shape[:2]
    a, a_last, rule = _spending(alpha, looks, max_looks)
    arms = ((g.mean(axis=1), c.mean(axis=1)) if reduce is None else
            tuple(np.array([reduce(x) for x in arm], float) for arm in (g, c)))
    diffs = tuple(float(x) for x in arms[0] - arms[1])
    diff = float(np.mean(diffs))
    size = f"{s} seed{'s' if s != 1 else ''} x {n} images"
    hib = "higher is better" if higher_is_better else "lower is better"
    base = dict(metric=metric, higher_is_better=higher_is_better, seeds=s, images=n,
                differences=diffs, difference=diff, resolution=resolution, stopping_rule=rule,
                looks=looks, max_looks=max_looks, alpha=alpha, alpha_look=a, alpha_final=a_last)

    if not math.isfinite(diff):
        return Verdict(**base, conclusion="undetermined", method="none: not finite",
                       text=f"undetermined: the difference is not finite (GCT "
                            f"{np.mean(arms[0]):.4g} {metric}, control {np.mean(arms[1]):.4g}, "
                            f"{size}): look for NaN losses or empty metrics")
    if reduce is None:
        comp = _crossed(g - c)
        method = ("paired per-image differences; " + (
            "one seed: the per-image (McNemar-type) variance only, seed spread unknown"
            if s == 1 else "crossed seeds x images variance (two-way ANOVA without "
                           "replication, components clipped at 0)"))
        scale = (rule_of_three_scale or float(max(g.max(), c.max()) - min(g.min(), c.min()))
                 or float(max(np.abs(g).max(), np.abs(c).max())) or 1.0)
    else:
        reps = _bootstrap(g, c, reduce, bootstrap, rng_seed)
        bad = int((~np.isfinite(reps)).sum())
        if bad:
            return Verdict(**base, conclusion="undetermined", method="none: not finite",
                           text=f"undetermined: GCT {_num(diff, 3)} {metric}, but {bad} of "
                                f"{bootstrap} bootstrap resamples gave a non-finite {metric} "
                                f"(does reduce divide by zero?), so there is no interval")
        comp = {"kind": "bootstrap", "image_term": float(np.var(reps, ddof=1)),
                "seed_var": float(np.var(diffs, ddof=1)) if s > 1 else None}
        method = (f"paired bootstrap over images ({bootstrap} resamples, rng_seed {rng_seed}) "
                  "plus the seed term s_d^2/S (residual counted twice: conservative; seeds "
                  "not resampled)")
        scale = rule_of_three_scale or float(np.abs(np.r_[arms[0], arms[1]]).max()) or 1.0
    zero = bool(np.array_equal(g, c))
    comp["rule_of_three_scale"] = scale if zero else None
    var, df = (float(x) for x in _project(comp, s, n))
    se = math.sqrt(max(var, 0.0))
    q95, q90, q80 = stats.t.ppf([1 - a / 2, 1 - a, POWER], df)
    f95, f90 = _floors(comp, n, a)
    h95, h90 = max(q95 * se, f95), max(q90 * se, f90)
    ci95, ci90 = (diff - h95, diff + h95), (diff - h90, diff + h90)
    mde = max((q95 + q80) * se, f95) if s > 1 else None
    need, more_images, limit = (_seeds_needed(comp, n, a_last, resolution)
                                if s > 1 and resolution is not None else (None, None, None))

    method += f", Satterthwaite df {df:.3g}, t interval; " + (
        "ci95/ci90 are the nominal 95%/90% intervals" if max_looks in (None, 1) else
        f"ci95/ci90 are the {_pct(a)}/{_pct(2 * a)} intervals at this look's spent alpha "
        f"{a:.3g} (look {looks} of {max_looks}), wider than nominal 95%/90%")
    method += ("; no resolution: equivalence not tested" if resolution is None else
               f"; equivalence by TOST: ci90 inside ±{resolution:g}")
    if zero:
        method += f"; no image disagrees: rule-of-three floor -ln(q)/N x {scale:g}"

    dec = _dec(h95, *ci95)
    d = _num(diff, dec)
    i95 = f"{_pct(a)} interval {_num(ci95[0], dec)} to {_num(ci95[1], dec)}"
    direction = ci95[0] > 0 or ci95[1] < 0
    better = (diff > 0) == higher_is_better
    if s == 1:
        conclusion = "undetermined"
        text = (f"undetermined: one seed; GCT {d} {metric} vs control on these images "
                f"(per-image {i95}, {n} images), but the seed-to-seed spread is unknown: "
                "run --seeds 3 or more")
    elif resolution is not None and -resolution < ci90[0] and ci90[1] < resolution:
        conclusion, dec = "equivalent", _dec(h90, *ci90)
        text = (f"equivalent within ±{resolution:g} {metric}: GCT {_num(diff, dec)} "
                f"({_pct(2 * a)} interval {_num(ci90[0], dec)} to {_num(ci90[1], dec)}, "
                f"{size}; {hib})")
        if direction:
            text += (f"; the {_pct(a)} interval excludes 0: a real "
                     f"{'gain' if better else 'loss'}, smaller than the resolution")
    elif direction:
        conclusion = "gct_better" if better else "control_better"
        text = (f"GCT {'better' if better else 'worse'}: {d} {metric} ({i95}, {size}; "
                f"MDE {_num(mde, dec, False)}; {hib})")
    else:
        conclusion = "inconclusive"
        text = (f"inconclusive: GCT {d} {metric}, {i95} ({size}; {hib}); "
                f"MDE {_num(mde, dec, False)}")
        if resolution is None:
            text += ": give a resolution (--resolution) to test equivalence"
        elif more_images:
            text += (f": more seeds cannot resolve ±{resolution:g}, the images alone leave an "
                     f"MDE of {_num(limit, dec, False)}; more validation images are needed")
        elif need is None:
            text += f": more than a million seeds would be needed to resolve ±{resolution:g}"
        elif need <= s:
            text += (f" is within ±{resolution:g}, but the estimate sits between 0 and the "
                     "resolution: a few more seeds would settle it")
        else:
            text += f": about {need} seeds would resolve ±{resolution:g}"
    return Verdict(**base, se=se, df=df, ci95=ci95, ci90=ci90, conclusion=conclusion, mde=mde,
                   seeds_for_resolution=need, more_images_needed=more_images, method=method,
                   components=comp, text=text)


def should_stop(v: Verdict, max_seeds: int) -> tuple[bool, str]:
    """Whether ``--seeds auto`` stops after ``v.seeds`` seeds, and why. Never before 2 seeds;
    stop on a decision (better, worse, equivalent), at ``max_seeds``, or for futility.

    Futility is conditional power under the current trend: take the current difference as
    the truth; the remaining seeds then move the final mean by N(0, tau^2), tau^2 = (M-S)
    (seed + residual/N variance of one seed's difference)/M^2 (images are shared, so their
    term does not move); the final look has the standard error projected to M = max_seeds
    and the last look's alpha. Stop when both the chance of a direction (|final| beyond
    the ci95 half-width) and of equivalence (|final| + ci90 half-width inside ±resolution)
    are below FUTILITY. It only removes looks, so the false-'better' rate stays within
    alpha. (Asking the current estimate itself to reach a call, i.e. conditional power
    near 50%, stopped too many real gains at 2 seeds in simulation.)"""
    from scipy import stats  # quantiles; json_safe alone needs only numpy

    if v.seeds < 2:
        return False, "never stop before 2 seeds: the seed-to-seed spread is unknown"
    if v.conclusion in ("gct_better", "control_better", "equivalent"):
        return True, f"{v.conclusion} at {v.seeds} seeds"
    if v.seeds >= max_seeds:
        return True, f"reached the maximum of {max_seeds} seeds: {v.conclusion}"
    if v.se is None or not math.isfinite(v.difference):
        return True, "the difference or its interval is not finite: more seeds will not fix it"
    comp, n, a, d = v.components, v.images, v.alpha_final, v.difference
    var, df = (float(x) for x in _project(comp, max_seeds, n))
    q95, q90 = stats.t.ppf([1 - a / 2, 1 - a], df)
    f95, f90 = _floors(comp, n, a)
    h95, h90 = max(q95 * math.sqrt(var), f95), max(q90 * math.sqrt(var), f90)
    one = comp["seed"] + comp["residual"] / n if comp["kind"] == "crossed" else comp["seed_var"]
    tau = math.sqrt((max_seeds - v.seeds) * one) / max_seeds
    cdf = (lambda x: stats.norm.cdf(x / tau)) if tau > 0 else (lambda x: float(x > 0))
    p_dir = cdf(d - h95) + cdf(-d - h95)
    lim = (v.resolution or 0.0) - h90
    p_eq = cdf(lim - d) - cdf(-lim - d) if lim > 0 else 0.0
    odds = f"P(direction) {p_dir:.2f}, P(equivalent) {p_eq:.2f}"
    if max(p_dir, p_eq) >= FUTILITY:
        return False, f"continue: at {max_seeds} seeds, on the current trend, {odds}"
    return True, f"futility: even at {max_seeds} seeds, on the current trend, {odds}"
