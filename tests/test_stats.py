"""eval.stats against independent computations: scipy's bootstrap and binomial test, a loop over
the resamples, and outcomes whose answers are known."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as st

from common.cli import UsageError
from eval import stats as S

ROUNDED = 6e-5  # the records keep 4 decimals of a percentage


def _mean_of_means(*samples, axis=-1):
    return np.mean([s.mean(axis=axis) for s in samples], axis=0)


def _outcomes(rng, sizes, p=0.5):
    return {f"g{i}": rng.binomial(1, p, n) for i, n in enumerate(sizes)}


def test_the_interval_is_scipys_percentile_bootstrap_within_each_group():
    rng = np.random.default_rng(1)
    groups = _outcomes(rng, (15, 15, 9, 30), 0.4)
    got = S.intervals(groups, resamples=3000, seed=7)
    for name, values in groups.items():
        ref = st.bootstrap((values.astype(float),), np.mean, n_resamples=3000, method="percentile",
                           rng=np.random.default_rng(7)).confidence_interval
        assert (got[name]["low"], got[name]["high"]) == pytest.approx((100 * ref.low, 100 * ref.high), abs=ROUNDED)
        assert got[name]["score"] == pytest.approx(100 * values.mean(), abs=ROUNDED)
    ref = st.bootstrap(tuple(v.astype(float) for v in groups.values()), _mean_of_means, n_resamples=3000,
                       method="percentile", rng=np.random.default_rng(7)).confidence_interval
    assert (got["average"]["low"], got["average"]["high"]) == \
        pytest.approx((100 * ref.low, 100 * ref.high), abs=ROUNDED)
    assert got["average"]["score"] == pytest.approx(100 * np.mean([v.mean() for v in groups.values()]), abs=ROUNDED)


def test_a_group_at_zero_or_all_right_has_an_interval_of_zero_width():
    got = S.intervals({"none": [0] * 15, "all": [1] * 15, "half": [0, 1] * 5})
    assert got["none"] == {"score": 0.0, "low": 0.0, "high": 0.0}
    assert got["all"] == {"score": 100.0, "low": 100.0, "high": 100.0}
    assert got["half"]["low"] < 50 < got["half"]["high"]


def test_the_paired_difference_is_scipys_paired_bootstrap_and_mcnemar_its_binomial_test():
    rng = np.random.default_rng(2)
    a, b = _outcomes(rng, (15, 20, 12), 0.6), _outcomes(rng, (15, 20, 12), 0.3)
    got = S.paired(a, b, resamples=2000, seed=3)
    for name in a:
        ref = st.bootstrap((a[name].astype(float), b[name].astype(float)), lambda x, y, axis=-1:
                           x.mean(axis=axis) - y.mean(axis=axis), paired=True, n_resamples=2000,
                           method="percentile", rng=np.random.default_rng(3)).confidence_interval
        assert (got[name]["low"], got[name]["high"]) == pytest.approx((100 * ref.low, 100 * ref.high), abs=ROUNDED)
        a_only, b_only = int(((a[name] == 1) & (b[name] == 0)).sum()), int(((b[name] == 1) & (a[name] == 0)).sum())
        assert (got[name]["a_only"], got[name]["b_only"]) == (a_only, b_only)
        if a_only + b_only:
            assert got[name]["p"] == pytest.approx(st.binomtest(min(a_only, b_only), a_only + b_only, 0.5).pvalue,
                                                   rel=1e-12)
    diffs = tuple((a[n] - b[n]).astype(float) for n in a)  # the paired bootstrap of the average: differences
    ref = st.bootstrap(diffs, _mean_of_means, n_resamples=2000, method="percentile",
                       rng=np.random.default_rng(3)).confidence_interval
    assert (got["average"]["low"], got["average"]["high"]) == \
        pytest.approx((100 * ref.low, 100 * ref.high), abs=ROUNDED)
    everything = st.binomtest(min(sum(r["a_only"] for n, r in got.items() if n != "average"),
                                  sum(r["b_only"] for n, r in got.items() if n != "average")),
                              sum(r["a_only"] + r["b_only"] for n, r in got.items() if n != "average"), 0.5)
    assert got["average"]["p"] == pytest.approx(everything.pvalue, rel=1e-12)


def test_known_mcnemar_p_values_and_identical_models():
    ten_to_none = S.mcnemar_exact([1] * 10 + [0] * 5, [0] * 10 + [0] * 5)
    assert ten_to_none == {"a_only": 10, "b_only": 0, "p": 2 / 2 ** 10}  # 0.001953125
    assert S.mcnemar_exact([1, 0, 1, 0], [0, 1, 1, 0])["p"] == 1.0  # one each way
    assert S.mcnemar_exact([1, 1, 1, 0, 0], [0, 0, 0, 1, 0])["p"] == pytest.approx(2 * 5 / 16)  # 3 vs 1: 2 P(X<=1)
    rng = np.random.default_rng(4)
    a = _outcomes(rng, (15, 15))
    same = S.paired(a, a)
    assert all(r["diff"] == r["low"] == r["high"] == 0 and r["p"] == 1.0 and r["a_only"] == r["b_only"] == 0
               for r in same.values())
    assert S.pooled([a, a], [a, a]) == {"diff": 0.0, "low": 0.0, "high": 0.0, "p": 1.0, "seeds": 2}
    with pytest.raises(ValueError, match="not the same items"):
        S.paired({"g": [1, 0]}, {"g": [1, 0, 1]})


def test_the_pooled_bootstrap_draws_items_shared_by_the_seeds_and_seeds_with_replacement():
    rng = np.random.default_rng(5)
    seeds = 3
    a = [_outcomes(rng, (12, 8, 10), 0.7) for _ in range(seeds)]
    b = [_outcomes(rng, (12, 8, 10), 0.4) for _ in range(seeds)]
    groups = [["g0", "g1"], ["g1"], ["g0", "g1", "g2"]]  # each seed's own groups
    got = S.pooled(a, b, groups, resamples=500, seed=9)
    # a loop over the resamples, with the same draws in the same order: items per group, then seeds
    draw = np.random.default_rng(9)
    items = {g: draw.integers(0, len(a[0][g]), (500, len(a[0][g]))) for g in ("g0", "g1", "g2")}
    drawn = draw.integers(0, seeds, (500, seeds))
    stats = []
    for r in range(500):
        per_seed = [np.mean([np.mean(a[s][g][items[g][r]]) - np.mean(b[s][g][items[g][r]]) for g in groups[s]])
                    for s in range(seeds)]
        stats.append(np.mean([per_seed[s] for s in drawn[r]]))
    stats = np.array(stats)
    estimate = np.mean([np.mean([a[s][g].mean() - b[s][g].mean() for g in groups[s]]) for s in range(seeds)])
    assert got["diff"] == pytest.approx(100 * estimate, abs=ROUNDED)
    assert (got["low"], got["high"]) == pytest.approx(tuple(100 * np.percentile(stats, [2.5, 97.5])), abs=ROUNDED)
    share = min((stats <= 0).mean(), (stats >= 0).mean())
    assert got["p"] == pytest.approx(min(1.0, max(2 * share, 1 / 500)))
    # one seed: the bootstrap over items alone, as `paired` draws it
    one = S.pooled(a[:1], b[:1], resamples=500, seed=9)
    alone = S.paired(a[0], b[0], resamples=500, seed=9)["average"]
    assert (one["diff"], one["low"], one["high"]) == (alone["diff"], alone["low"], alone["high"])
    assert S.pooled(a, b, [["g0"], [], ["g1"]]) is None  # a seed without a group: not measured
    score = S.pooled_score(a, resamples=500, seed=9)
    assert score["score"] == pytest.approx(100 * np.mean([np.mean([v.mean() for v in x.values()]) for x in a]),
                                           abs=ROUNDED)


def test_comparisons_name_an_unknown_model():
    assert S.comparisons(["mcl", "baseline", "ensemble"], ["mcl", "ensemble", "baseline"]) == \
        [("mcl", "baseline"), ("mcl", "ensemble")]
    assert S.comparisons([], ["mcl"]) == []
    with pytest.raises(UsageError, match="--compare: unknown model 'base' \\(models: mcl, stage1\\)"):
        S.comparisons(["mcl", "base"], ["mcl", "stage1"])
    with pytest.raises(UsageError, match="at least two"):
        S.comparisons(["mcl"], ["mcl"])


def test_draws_in_blocks_give_the_same_resamples(monkeypatch):
    """Memory stays bounded for many items (the indices are drawn in blocks of about CHUNK values)
    and the blocks change nothing: the same generator stream, the same intervals."""
    rng = np.random.default_rng(6)
    a = [_outcomes(rng, (40, 25)) for _ in range(2)]
    b = [_outcomes(rng, (40, 25)) for _ in range(2)]
    whole = (S.intervals(a[0], resamples=700), S.paired(a[0], b[0], resamples=700), S.pooled(a, b, resamples=700))
    monkeypatch.setattr(S, "CHUNK", 97)  # blocks of 2 or 3 rows, a ragged last block
    assert (S.intervals(a[0], resamples=700), S.paired(a[0], b[0], resamples=700),
            S.pooled(a, b, resamples=700)) == whole


def test_a_group_the_outcomes_lack_is_refused_not_weighted():
    a = [{"x": [1, 1, 1, 1]}]
    b = [{"x": [0, 0, 0, 0]}]
    assert S.pooled(a, b, [["x"]], resamples=50)["diff"] == 100.0
    with pytest.raises(ValueError, match=r"no outcomes for group\(s\) \['typo'\]"):
        S.pooled(a, b, [["x", "typo"]])


def test_the_chart_draws_each_interval_and_the_chance_line():
    import matplotlib.pyplot as plt

    from eval.plots import intervals_figure
    models = {"mcl": S.intervals({"Orientation": [1] * 9 + [0] * 6, "Spatial": [0] * 15}),
              "baseline": S.intervals({"Orientation": [1] * 2 + [0] * 13, "Spatial": [1] * 15})}
    fig = intervals_figure(models, "MMVP", "pairs correct (%)", S.CHANCE_MMVP)
    ax = fig.axes[0]
    chance = [line for line in ax.get_lines() if list(line.get_ydata()) == [25.0, 25.0]]
    assert len(chance) == 1 and chance[0].get_linestyle() == ":"
    bars = [round(b.get_height(), 4) for b in ax.patches]
    assert bars == [models[m][g]["score"] for m in models for g in ("Orientation", "Spatial", "average")]
    # each bar's error bar spans its interval
    spans = sorted((round(min(seg[:, 1]), 4), round(max(seg[:, 1]), 4)) for c in ax.collections
                   for seg in c.get_segments())
    assert spans == sorted((models[m][g]["low"], models[m][g]["high"]) for m in models
                           for g in ("Orientation", "Spatial", "average"))
    plt.close(fig)
