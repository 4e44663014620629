"""Intervals and paired tests on right/wrong outcomes, for every evaluation of the project.

Each evaluation ends in one outcome per item (an MMVP pair, a SugarCrepe caption choice, a probe
or zero-shot sample: 1 right, 0 wrong), items fall into groups (MMVP patterns, SugarCrepe
files, data sets), and a score is a group's share right; an average is the mean of its groups'
scores (MMVP-VLM's average is the mean of its patterns, not of its pairs).

- `interval`: the score and its bootstrap 95% interval, percentile method, items resampled
  with replacement within each group (a stratified bootstrap; what scipy.stats.bootstrap gives
  with one sample per group, `method="percentile"`, the same seeded Generator). A group at 0
  or with every item right resamples to itself only: its interval is [0, 0] or [100, 100], of
  zero width. That is what the percentile method gives, not certainty (with 15 pairs, 0 right
  is consistent with a true rate up to about 18%, exact one-sided 95%).
- `paired`: the difference of two models on the same items with its interval (the same items
  resampled for both: the bootstrap of the per-item differences) and an exact McNemar test on
  the items where they disagree (two-sided binomial, p = 1 when they never disagree).
- `pooled`: several seeds of both models on the same items: the mean over seeds of the
  difference, with a bootstrap over items and seeds at once (each resample draws items within
  each group, shared by all seeds, and seeds with replacement) and the two-sided bootstrap
  p-value of "no difference" (twice the smaller share of resampled differences on either side
  of 0, at least 1 / resamples when it is not 1).

Scores and differences are in percent. Every function takes `resamples` and `seed`; the
defaults are what the project's records and reports use.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

RESAMPLES = 10_000
SEED = 0
LEVEL = 0.95
CHANCE_MMVP = 25.0  # a pair counts when both of its statements pick their image: 1/2 x 1/2
CHUNK = 2_000_000  # item indices drawn at once (times the seeds in `pooled`): memory bounded whatever the items


def _groups(outcomes: Mapping[str, Sequence] | Sequence[Sequence]) -> list[np.ndarray]:
    values = outcomes.values() if isinstance(outcomes, Mapping) else outcomes
    groups = [np.asarray(v, dtype=np.float64) for v in values]
    if not groups or any(g.ndim != 1 or g.size == 0 for g in groups):
        raise ValueError("every group needs at least one outcome")
    return groups


def _draws(rng: np.random.Generator, n: int, resamples: int, copies: int = 1):
    """Yield (rows, indices) blocks of a (resamples, n) draw of item indices, about CHUNK values
    (times `copies` once used) at a time; the blocks come out of the generator's stream exactly
    as one whole draw would."""
    step = max(1, CHUNK // (n * copies))
    for start in range(0, resamples, step):
        rows = slice(start, min(resamples, start + step))
        yield rows, rng.integers(0, n, (rows.stop - rows.start, n))


def resampled_means(groups: list[np.ndarray], resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(groups, resamples): each group's mean over its items drawn with replacement, group by
    group in order (scipy.stats.bootstrap's order of draws for independent samples)."""
    out = np.empty((len(groups), resamples))
    for j, g in enumerate(groups):
        for rows, items in _draws(rng, g.size, resamples):
            out[j, rows] = g[items].mean(-1)
    return out


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    alpha = (1 - level) / 2
    low, high = np.percentile(values, [100 * alpha, 100 * (1 - alpha)])
    return float(low), float(high)


def _record(estimate: float, low: float, high: float) -> dict:
    return {"score": round(100 * estimate, 4), "low": round(100 * low, 4), "high": round(100 * high, 4)}


def interval(outcomes: Mapping[str, Sequence] | Sequence[Sequence], resamples: int = RESAMPLES, seed: int = SEED,
             level: float = LEVEL) -> dict:
    """{"score", "low", "high"} (%) of the mean over groups of each group's share right."""
    groups = _groups(outcomes)
    means = resampled_means(groups, resamples, np.random.default_rng(seed)).mean(0)
    return _record(float(np.mean([g.mean() for g in groups])), *percentile_interval(means, level))


def intervals(outcomes: Mapping[str, Sequence], resamples: int = RESAMPLES, seed: int = SEED,
              level: float = LEVEL) -> dict:
    """{group: interval of that group alone, ..., "average": interval of the mean over groups}."""
    out = {name: interval([v], resamples, seed, level) for name, v in outcomes.items()}
    out["average"] = interval(outcomes, resamples, seed, level)
    return out


def mcnemar_exact(a: Sequence, b: Sequence) -> dict:
    """Exact two-sided McNemar test of two models' outcomes on the same items: the items only
    `a` gets right ("a_only") and only `b` gets right ("b_only") are a fair coin's flips under
    the null; p = min(1, 2 P(X <= min)), X ~ Binomial(a_only + b_only, 1/2); 1 when none."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"the two models have {a.size} and {b.size} outcomes: not the same items")
    from scipy.stats import binom

    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    n, k = a_only + b_only, min(a_only, b_only)
    p = 1.0 if n == 0 else min(1.0, 2 * float(binom.cdf(k, n, 0.5)))
    return {"a_only": a_only, "b_only": b_only, "p": p}


def _check_paired(a: Mapping[str, Sequence], b: Mapping[str, Sequence]) -> None:
    if list(a) != list(b):
        raise ValueError(f"the two models have other groups: {list(a)} and {list(b)}")
    for name in a:
        if len(a[name]) != len(b[name]):
            raise ValueError(f"group {name!r}: {len(a[name])} and {len(b[name])} outcomes, not the same items")


def paired(a: Mapping[str, Sequence], b: Mapping[str, Sequence], resamples: int = RESAMPLES, seed: int = SEED,
           level: float = LEVEL) -> dict:
    """`a` - `b` on the same items, per group and on the average: {group: {"diff", "low", "high",
    "a_only", "b_only", "p"}}; the average's McNemar test is on all items together."""
    _check_paired(a, b)
    diffs = {name: np.asarray(a[name], dtype=np.float64) - np.asarray(b[name], dtype=np.float64) for name in a}
    out = {}
    for name in a:
        rec = interval([diffs[name]], resamples, seed, level)
        out[name] = {"diff": rec["score"], "low": rec["low"], "high": rec["high"], **mcnemar_exact(a[name], b[name])}
    rec = interval(diffs, resamples, seed, level)
    out["average"] = {"diff": rec["score"], "low": rec["low"], "high": rec["high"],
                      **mcnemar_exact(np.concatenate([np.asarray(v) for v in a.values()]),
                                      np.concatenate([np.asarray(v) for v in b.values()]))}
    return out


def bootstrap_p(values: np.ndarray) -> float:
    """Two-sided bootstrap p-value of 0: twice the smaller share on either side, in [1/n, 1]."""
    share = min(float((values <= 0).mean()), float((values >= 0).mean()))
    return min(1.0, max(2 * share, 1 / values.size))


def pooled(a: Sequence[Mapping[str, Sequence]], b: Sequence[Mapping[str, Sequence]],
           groups: Sequence[Sequence[str]] | None = None, resamples: int = RESAMPLES, seed: int = SEED,
           level: float = LEVEL) -> dict:
    """The mean over seeds of `a` - `b` (%), each seed's difference the mean over its `groups`
    (default: all) of the group differences; a[s] and b[s] are seed s's outcomes, every seed on
    the same items. Returns {"diff", "low", "high", "p", "seeds"}; None when a seed has no group."""
    if len(a) != len(b) or not a:
        raise ValueError(f"{len(a)} and {len(b)} seeds: the two models need the same seeds")
    names = list(a[0])
    for x, y in zip(a, b):
        _check_paired(a[0], x)
        _check_paired(x, y)
    groups = [list(g) for g in groups] if groups is not None else [names] * len(a)
    if len(groups) != len(a):
        raise ValueError(f"{len(groups)} group lists for {len(a)} seeds")
    unknown = sorted({n for g in groups for n in g} - set(names))
    if unknown:
        raise ValueError(f"no outcomes for group(s) {unknown} (groups: {names})")
    used = [n for n in names if any(n in g for g in groups)]
    if not used or not all(groups):
        return None
    seeds = len(a)
    # weights[s, j]: seed s's share of group j in its average
    weights = np.array([[1 / len(g) if n in g else 0.0 for n in used] for g in groups])
    diffs = [np.stack([np.asarray(x[n], dtype=np.float64) - np.asarray(y[n], dtype=np.float64)
                       for x, y in zip(a, b)]) for n in used]  # per group: (seeds, items)
    rng = np.random.default_rng(seed)
    estimate = float((weights * np.stack([d.mean(1) for d in diffs], 1)).sum(1).mean())
    per_seed = np.zeros((seeds, resamples))
    for j, d in enumerate(diffs):
        for rows, items in _draws(rng, d.shape[1], resamples, seeds):
            per_seed[:, rows] += weights[:, j:j + 1] * d[:, items].mean(-1)  # (seeds, rows)
    drawn = rng.integers(0, seeds, (resamples, seeds))
    stat = per_seed[drawn, np.arange(resamples)[:, None]].mean(1)
    low, high = percentile_interval(stat, level)
    return {"diff": round(100 * estimate, 4), "low": round(100 * low, 4), "high": round(100 * high, 4),
            "p": bootstrap_p(stat), "seeds": seeds}


def pooled_score(a: Sequence[Mapping[str, Sequence]], groups: Sequence[Sequence[str]] | None = None,
                 resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> dict | None:
    """One model's mean score over seeds (%) with the bootstrap over items and seeds of `pooled`:
    {"score", "low", "high", "seeds"}."""
    rec = pooled(a, [{n: np.zeros(len(v)) for n, v in x.items()} for x in a], groups, resamples, seed, level)
    return rec and {"score": rec["diff"], "low": rec["low"], "high": rec["high"], "seeds": rec["seeds"]}


def comparisons(compare: Sequence[str], names: Sequence[str], option: str = "--compare") -> list[tuple[str, str]]:
    """`compare` = [A, B, C, ...] -> [(A, B), (A, C), ...]: the first model against each of the
    others; a name that is not one of `names` is a UsageError naming it."""
    from common.cli import UsageError

    if not compare:
        return []
    if len(compare) < 2:
        raise UsageError(f"{option}: give at least two model names (the first is compared with each other one)")
    for name in compare:
        if name not in names:
            raise UsageError(f"{option}: unknown model {name!r} (models: {', '.join(names)})")
    return [(compare[0], other) for other in compare[1:] if other != compare[0]]


def outcome_stats(outcomes: Mapping[str, Mapping[str, Sequence]], compare: Sequence[str] = (),
                  resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> dict:
    """The record an evaluation writes beside its scores: every model's `intervals` and, for
    `compare`, the `paired` differences ("A - B")."""
    return {"level": level, "resamples": resamples, "seed": seed,
            "models": {name: intervals(o, resamples, seed, level) for name, o in outcomes.items()},
            "comparisons": {f"{a} - {b}": paired(outcomes[a], outcomes[b], resamples, seed, level)
                            for a, b in comparisons(compare, list(outcomes))}}


def text_table(stats: Mapping, first_column: str) -> str:
    """The scores with their intervals per group (rows) and model (columns), then each
    comparison's difference, interval and McNemar p-value per group, as plain text."""
    models = stats["models"]
    groups = list(next(iter(models.values())))
    width = max(20, *(len(n) + 2 for n in models))
    lines = [f"{first_column:<28}" + "".join(f"{n:>{width}}" for n in models)]
    for g in groups:
        lines.append(f"{g:<28}" + "".join(f"{fmt_interval(models[n][g]):>{width}}" for n in models))
    for label, per in stats["comparisons"].items():
        lines.append(f"{label}: " + "; ".join(f"{g} {fmt_interval(r, 'diff', True)} p={fmt_p(r['p'])}"
                                               for g, r in per.items()))
    return "\n".join(lines)


def fmt_interval(rec: Mapping | None, key: str = "score", signed: bool = False) -> str:
    """'49.3 [30.1, 70.2]' (one decimal), '+18.3 [6.0, 31.0]' when signed; '-' for None."""
    if not rec:
        return "-"
    sign = "+" if signed else ""
    return f"{rec[key]:{sign}.1f} [{rec['low']:.1f}, {rec['high']:.1f}]"


def fmt_p(p: float | None, resamples: int | None = None) -> str:
    """A p-value in two significant digits; a bootstrap p-value (`resamples` given) at its floor
    1 / resamples reads "<=0.0001": no resampled difference reached 0."""
    if p is None:
        return "-"
    if resamples and p <= 1 / resamples:
        return f"<={1 / resamples:.2g}"
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"
