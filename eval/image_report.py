"""The image demo's comparison (`launch demo --modality image`): MCL against plain SimCLR, per attribute.

The three methods are read from their run folders, as in eval.report: `baseline` (plain
SimCLR, one stage, all stages' steps), `ensemble` (independently seeded plain SimCLR stages,
merged) and `mcl` (with its stages alone as stage1, stage2, ...). Each is scored by the
attribute probes on the held-out shards (eval.probes: linear and kNN).

Which attribute plain SimCLR suppresses is read off MCL's stage 1, plain SimCLR after one
stage's steps, per seed, as eval.report does for CLIP: an attribute is "suppressed" when its
linear probe stays within SUPPRESSED of the way from chance to 100%; the "easy" attribute is the
one it learns best (by the same chance-relative measure). The models compared (the baseline, the
ensemble, MCL) are not the one that chose: the baseline's and the ensemble's scores carry no
selection, and MCL's merged features include stage 1's, so the choice can only cost MCL. That
an attribute can be learned at all is the views' part (docs/unimodal.md): they keep every
attribute the probes ask. The verdict is the unimodal claim: MCL's linear probe beats the
baseline's (plain SimCLR for all the steps) on the suppressed attributes by >= GAIN points,
with mean - std over seeds > MARGIN and the pooled bootstrap 95% interval above 0, and loses
at most MARGIN points to it on the easy one (the mean and the interval's low end >= -MARGIN;
a gain there is no loss). Intervals and p-values: eval.stats, items and seeds resampled
together, with each seed's exact McNemar test, as in eval.report.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from common.io import write_json
from eval import outcomes as O
from eval import report as R
from eval import stats as S
from eval.probes import KNN_K, PROBE_TITLES, RECORD_NAME
from pipeline.stage import RunDir

METHODS = R.METHODS
PROBES = ("linear", "knn")
OUTCOME_KINDS = {"linear": "probe", "knn": "probe_knn"}  # eval.outcomes.SOURCES
SUPPRESSED = 0.25  # a share of the way from chance to 100%
GAIN, MARGIN = 10.0, 5.0


def _share(acc: float, chance: float) -> float:
    """Where an accuracy lies between chance (0) and 100% (1)."""
    return (acc - chance) / (100.0 - chance) if chance < 100 else 0.0


def seed_results(runs: dict[str, Path], seed: int, config: dict) -> dict:
    """{"models": {name: {"linear": {attr: %}, "knn": {...}, "chance": {...}}}, "outcomes":
    {"probe" | "probe_knn": {name: {attr: "0110..."}}}, "seeds", "config", "comparison"} of one seed."""
    models, outcomes = {}, {}
    for method, run_dir in runs.items():
        evals = RunDir(run_dir).eval_dir
        probe = R._read(evals / RECORD_NAME)
        items = O.read_eval_dir(evals)
        names = [method] + ([n for n in probe if n.startswith("stage")] if method == "mcl" else [])
        for name in names:
            per = probe.get(name, {})
            models[name] = {k: {a: r[k] for a, r in per.items() if k in r} for k in (*PROBES, "chance")}
            for kind in OUTCOME_KINDS.values():
                if name in items.get(kind, {}):
                    outcomes.setdefault(kind, {})[name] = {g: O.pack(v) for g, v in items[kind][name].items()}
    return {"models": models, "outcomes": outcomes, "seeds": [seed], "config": config,
            "comparison": compare(models)}


def compare(models: dict) -> dict:
    """The seed's suppressed and easy attributes (from stage 1's linear probe) and MCL's gains
    over the baseline and the ensemble on each attribute and group."""
    first = models.get("stage1", {}).get("linear", {})
    chance = models.get("stage1", {}).get("chance", {})
    if not first:
        return {"suppressed": [], "easy": [], "gains": {}}
    share = {a: _share(v, chance[a]) for a, v in first.items()}
    suppressed = [a for a in first if share[a] <= SUPPRESSED]
    easy = [max(share, key=share.get)]
    gains = {}
    for other in ("baseline", "ensemble"):
        if other in models and "mcl" in models:
            for probe in PROBES:
                diff = {a: models["mcl"][probe][a] - models[other][probe][a] for a in models["mcl"][probe]}
                gains[f"{other}/{probe}"] = {
                    **{a: round(d, 2) for a, d in diff.items()},
                    "suppressed": round(statistics.fmean(diff[a] for a in suppressed), 2) if suppressed else None,
                    "easy": round(statistics.fmean(diff[a] for a in easy), 2)}
    return {"suppressed": suppressed, "easy": easy, "gains": gains}


def _stats(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0}


def pooled_tests(per_seed: list[dict]) -> dict:
    """{"mcl - B": {probe: {attr | "suppressed" | "easy": pooled test}}} for B = baseline, ensemble."""
    out: dict = {}
    for other in ("baseline", "ensemble"):
        for probe, kind in OUTCOME_KINDS.items():
            a, b = R._seed_outcomes(per_seed, kind, "mcl"), R._seed_outcomes(per_seed, kind, other)
            if a is None or b is None:
                continue
            sets = {g: [[g]] * len(a) for g in a[0]}
            for group in ("suppressed", "easy"):
                lists = [r["comparison"][group] for r in per_seed]
                if all(lists):
                    sets[group] = lists
            rec = {}
            for label, groups in sets.items():
                test = S.pooled(a, b, groups)
                if test is not None:
                    test["mcnemar"] = [R._mcnemar(x, y, g) for x, y, g in zip(a, b, groups)]
                rec[label] = test
            out.setdefault(f"mcl - {other}", {})[probe] = rec
    return out


def pooled_intervals(per_seed: list[dict]) -> dict:
    """{probe: {model: {attr: pooled score}}}."""
    out: dict = {}
    for probe, kind in OUTCOME_KINDS.items():
        for name in dict.fromkeys(n for r in per_seed for n in r["outcomes"].get(kind, {})):
            seeds = R._seed_outcomes(per_seed, kind, name)
            if seeds is not None:
                out.setdefault(probe, {})[name] = {g: S.pooled_score(seeds, [[g]] * len(seeds)) for g in seeds[0]}
    return out


def summarize(per_seed: list[dict]) -> dict:
    """Mean ± std over seeds of every probe score and gain, pooled intervals and tests, and the verdict's flags."""
    names = dict.fromkeys(n for r in per_seed for n in r["models"])
    models = {}
    for name in names:
        models[name] = {}
        for probe in (*PROBES, "chance"):
            attrs = dict.fromkeys(a for r in per_seed for a in r["models"].get(name, {}).get(probe, {}))
            models[name][probe] = {a: _stats([r["models"].get(name, {}).get(probe, {}).get(a) for r in per_seed])
                                   for a in attrs}
    keys = dict.fromkeys(k for r in per_seed for k in r["comparison"]["gains"])
    gains = {k: {g: _stats([r["comparison"]["gains"].get(k, {}).get(g) for r in per_seed])
                 for g in dict.fromkeys(g for r in per_seed for g in r["comparison"]["gains"].get(k, {}))}
             for k in keys}
    base = gains.get("baseline/linear", {})
    tests = pooled_tests(per_seed)
    pooled = tests.get("mcl - baseline", {}).get("linear", {})
    suppressed_ok = _holds(base.get("suppressed"), lambda s: s["mean"] >= GAIN and s["mean"] - s["std"] > MARGIN) \
        and _holds(pooled.get("suppressed"), lambda t: t["low"] > 0)
    easy_ok = _holds(base.get("easy"), lambda s: s["mean"] >= -MARGIN) \
        and _holds(pooled.get("easy"), lambda t: t["low"] >= -MARGIN)
    every_seed = all(r["comparison"]["suppressed"] for r in per_seed)
    return {"seeds": [s for r in per_seed for s in r["seeds"]], "models": models, "gains": gains,
            "intervals": pooled_intervals(per_seed), "tests": tests,
            "suppressed": {str(r["seeds"][0]): r["comparison"]["suppressed"] for r in per_seed},
            "easy": {str(r["seeds"][0]): r["comparison"]["easy"] for r in per_seed},
            "shows_suppression": every_seed, "required_met": bool(every_seed and suppressed_ok and easy_ok),
            "config": per_seed[0]["config"]}


def _holds(stat: dict | None, test) -> bool:
    return bool(stat) and test(stat)


def table(summary: dict, probe: str = "linear") -> str:
    """One probe's accuracy per attribute and model (mean ± std over seeds), chance last, as Markdown."""
    names = R.model_names(summary)
    attrs = list(summary["models"][names[0]][probe])
    chance = summary["models"][names[0]]["chance"]
    lines = ["| model | " + " | ".join(attrs) + " |", "|---" * (len(attrs) + 1) + "|"]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(R._fmt(summary["models"][n][probe].get(a)) for a in attrs) + " |")
    lines.append("| chance | " + " | ".join(R._fmt(chance.get(a)) for a in attrs) + " |")
    return "\n".join(lines)


def verdict(summary: dict) -> list[str]:
    g, tests = summary["gains"], summary.get("tests", {})
    lines = [f"suppressed by plain SimCLR after one stage (stage1's linear probe <= {SUPPRESSED:.0%} of the way from "
             "chance to 100): " + "; ".join(f"seed {s}: {', '.join(p) or 'none'}"
                                           for s, p in summary["suppressed"].items()),
             "easy (what stage1 learns best): "
             + "; ".join(f"seed {s}: {', '.join(p)}" for s, p in summary["easy"].items())]
    for other in ("baseline", "ensemble"):
        rec = g.get(f"{other}/linear", {})
        test = tests.get(f"mcl - {other}", {}).get("linear", {})
        lines.append(f"MCL - {other}, linear probe, suppressed attributes: {R._fmt(rec.get('suppressed'))} points "
                     f"(mean ± std over seeds; pooled: {R._test_line(test.get('suppressed'))}); easy: "
                     f"{R._fmt(rec.get('easy'))} (pooled: {R._test_line(test.get('easy'))})")
    lines.append(f"required (MCL's linear probe on the suppressed attributes >= {GAIN:.0f} points above plain "
                 f"SimCLR's with mean - std > {MARGIN:.0f} and the 95% interval above 0; the easy attribute at most "
                 f"{MARGIN:.0f} points below, mean and interval): "
                 f"{'met' if summary['required_met'] else 'NOT met'}")
    return lines


def plot(summary: dict, path: Path) -> Path:
    """Linear and kNN probe accuracy per attribute and method, pooled over seeds with their 95%
    intervals as error bars, each attribute's chance dotted."""
    import matplotlib.pyplot as plt
    import numpy as np

    from eval.plots import save_png

    probes = [p for p in PROBES if summary.get("intervals", {}).get(p)]
    chance = {a: s["mean"] for a, s in summary["models"]["baseline"]["chance"].items()}
    attrs = list(chance)
    fig, axes = plt.subplots(1, len(probes), figsize=(max(8, 1.3 * len(probes) * len(attrs)), 3.8), sharey=True,
                             squeeze=False)
    for ax, probe in zip(axes[0], probes):
        per_model = {n: summary["intervals"][probe][n] for n in METHODS if n in summary["intervals"][probe]}
        width = 0.8 / max(1, len(per_model))
        for i, (name, per) in enumerate(per_model.items()):
            scores = np.array([per[a]["score"] for a in attrs])
            errors = np.array([[per[a]["score"] - per[a]["low"] for a in attrs],
                               [per[a]["high"] - per[a]["score"] for a in attrs]])
            ax.bar(np.arange(len(attrs)) + i * width - 0.4 + width / 2, scores, width, yerr=errors, capsize=2,
                   label=name)
        for j, a in enumerate(attrs):
            ax.hlines(chance[a], j - 0.45, j + 0.45, colors="black", linestyles="dotted")
        ax.set_xticks(np.arange(len(attrs)), attrs)
        ax.set_title(PROBE_TITLES[probe], fontsize=10)
        ax.set_ylim(0, 100)
    axes[0][0].set_ylabel("accuracy (%), 95% intervals; dotted: chance", fontsize=8)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"attribute probes, pooled over {len(summary['seeds'])} seed(s)", fontsize=10)
    return save_png(fig, path)


def write_report(out: Path, summary: dict, per_seed: list[dict], mcl_runs: dict[int, Path]) -> Path:
    """OUT/summary.json, OUT/probes.png and OUT/report.md."""
    write_json(out / "summary.json", summary, sort_keys=False)
    plot(summary, out / "probes.png")
    seed, mcl = next(iter(mcl_runs.items()))
    stages = R.run_stage_dirs(mcl)
    names = R.model_names(summary)
    seeds = f"pooled over {len(summary['seeds'])} seed(s)"
    parts = [
        "# MCL image-only demo report", "",
        f"Seeds: {', '.join(map(str, summary['seeds']))}. Image-only SimCLR stages; attribute probes on held-out "
        "shards: accuracy (%), mean ± std over seeds.", "",
        "### Linear probe", "", table(summary, "linear"), "",
        f"### kNN probe (k={KNN_K})", "", table(summary, "knn"), "",
        *[f"- {line}" for line in verdict(summary)], "",
        f"### Linear probe with 95% intervals and paired tests ({seeds})", "", R.INTERVALS.replace(
            "items (pairs within each pattern)", "items (test samples of each attribute)").replace(
            " Chance is 25.", ""), "",
        R.interval_table(summary, "linear", names), "",
        f"### kNN probe with 95% intervals ({seeds})", "", R.interval_table(summary, "knn", names), "",
        "![probes per attribute](probes.png)", "",
        f"## Clusters of the MCL stages (seed {seed}): purity per attribute", "",
        R._purity_table(stages), "",
        f"## Training of the MCL stages (seed {seed}): loss and the loader's batches", "",
        R._training_table(stages), "",
    ]
    return R.write_markdown(out / "report.md", parts)
