"""The demo's comparison: results.json per seed, a summary over seeds, and a Markdown report.

The three methods of the demo are read from their run folders (launch runs with MMVP and
probe evaluations): `baseline` (plain CLIP, one stage, all stages' steps), `ensemble`
(independently seeded plain CLIP stages, merged) and `mcl` (whose stages are also reported
alone as stage1, stage2, ...). Stage 1 of MCL is plain CLIP after one stage's steps: the
attributes it gets at most SUPPRESSED percent of MMVP pairs right while another gets at least
EASY are "suppressed", and the verdict compares MCL with the ensemble and the baseline on them.
The attributes that are not easy and that the baseline, trained for all the steps, still gets at
most SUPPRESSED percent right are "persistent": where suppression is more than slowness, MCL has
to beat the baseline on them (the default demo's second comparison).

Every score and difference comes with a bootstrap 95% interval and every comparison with a
p-value (eval.stats): each seed's results.json keeps every model's per-item outcomes (MMVP pairs,
SugarCrepe samples, zero-shot items, linear-probe test samples), all seeds share the same items,
and the summary pools them: the mean over seeds, with an interval from resampling items (within
each pattern or category) and seeds together, and the bootstrap p-value of no difference; each
seed's exact McNemar test on its pairs stands beside it. The verdict's claims are stated so: a
gain counts when it is at least GAIN points and its interval lies above 0; the easy attributes
are kept when the interval of the difference there stays above -MARGIN.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from common.cli import UsageError
from common.io import atomic_output, write_json
from eval import outcomes as O
from eval import stats as S
from eval.mmvp import SUMMARY_NAME
from eval.probes import RECORD_NAME
from eval.sugarcrepe import SUMMARY_NAME as SUGARCREPE_NAME
from eval.zeroshot import SUMMARY_NAME as ZEROSHOT_NAME
from eval.zeroshot import main_metric
from pipeline.stage import RunDir, StageDir

SUPPRESSED, EASY = 35.0, 90.0
GAIN, MARGIN = 10.0, 5.0
METHODS = ("baseline", "ensemble", "mcl")
COMPARED = (("mcl", "ensemble"), ("mcl", "baseline"))
AVERAGED = ("mmvp", "sugarcrepe")  # the evaluations whose benchmark defines an average over its groups


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def seed_results(runs: dict[str, Path], seed: int, config: dict) -> dict:
    """{"models": {name: {"mmvp", "sugarcrepe", "probe", "zeroshot"}}, "outcomes": {evaluation:
    {name: {group: "0110..."}}}, "seeds", "config", "comparison"} of one seed; runs maps each method
    to its run folder (its eval/ holds the evaluations' summaries and outcome files, eval.outcomes)."""
    models, outcomes = {}, {}
    for method, run_dir in runs.items():
        evals = RunDir(run_dir).eval_dir
        mmvp, probe, zeroshot = _read(evals / SUMMARY_NAME), _read(evals / RECORD_NAME), _read(evals / ZEROSHOT_NAME)
        sugarcrepe = _read(evals / SUGARCREPE_NAME).get("models", {})
        items = O.read_eval_dir(evals)
        names = [method] + ([n for n in mmvp if n.startswith("stage")] if method == "mcl" else [])
        for name in names:
            models[name] = {"mmvp": mmvp.get(name, {}), "probe": probe.get(name, {}),
                            "zeroshot": zeroshot.get(name, {}),
                            "sugarcrepe": {c: r["score"] for c, r in sugarcrepe.get(name, {}).items()}}
            for kind, per_model in items.items():
                if name in per_model:
                    outcomes.setdefault(kind, {})[name] = {g: O.pack(v) for g, v in per_model[name].items()}
    return {"models": models, "outcomes": outcomes, "seeds": [seed], "config": config,
            "comparison": compare(models)}


def compare(models: dict) -> dict:
    """Suppressed and easy patterns (from stage1) and the gains of MCL over the other methods."""
    stage1 = {p: v for p, v in models["stage1"]["mmvp"].items() if p != "average"}
    suppressed = [p for p, v in stage1.items() if v <= SUPPRESSED]
    easy = [p for p, v in stage1.items() if v >= EASY]

    def mean_over(name, patterns):
        return statistics.fmean(models[name]["mmvp"][p] for p in patterns) if patterns else None

    out = {"suppressed": suppressed, "easy": easy, "shows_suppression": bool(suppressed and easy)}
    for other in ("ensemble", "baseline"):
        if other in models:
            for group, patterns in (("suppressed", suppressed), ("easy", easy)):
                a, b = mean_over("mcl", patterns), mean_over(other, patterns)
                out[f"gain_vs_{other}_{group}"] = None if a is None else round(a - b, 2)
    if "baseline" in models:
        persistent = [p for p in stage1 if p not in easy and models["baseline"]["mmvp"].get(p, 100) <= SUPPRESSED]
        a, b = mean_over("mcl", persistent), mean_over("baseline", persistent)
        out["persistent"] = persistent
        out["gain_vs_baseline_persistent"] = None if a is None else round(a - b, 2)
        out["mcl_easy_min"] = min((models["mcl"]["mmvp"][p] for p in easy), default=None)
    return out


def summarize(per_seed: list[dict]) -> dict:
    """Mean and (sample) standard deviation over seeds of every score and gain (over the seeds that
    have it: a seed may lack a model, e.g. its baseline)."""
    def stats(values):
        values = [v for v in values if v is not None]
        if not values:
            return None
        # 4 places, so that the report's one-decimal tables round once (1.1547 -> 1.2, not 1.15 -> 1.1)
        return {"mean": round(statistics.fmean(values), 4),
                "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0}

    first = per_seed[0]
    names = dict.fromkeys(n for r in per_seed for n in r["models"])  # in order, from every seed
    models = {}
    for name in names:
        patterns = dict.fromkeys(p for r in per_seed for p in r["models"].get(name, {}).get("mmvp", {}))
        models[name] = {"mmvp": {p: stats([r["models"].get(name, {}).get("mmvp", {}).get(p) for r in per_seed])
                                 for p in patterns}}
    keys = dict.fromkeys(k for r in per_seed for k in r["comparison"] if k.startswith("gain_"))
    gains = {k: stats([r["comparison"].get(k) for r in per_seed]) for k in keys}
    tests = pooled_tests(per_seed)
    mmvp_tests = tests.get("mcl - ensemble", {}).get("mmvp", {})
    required = bool(all(r["comparison"]["shows_suppression"] for r in per_seed)
                    and claim(mmvp_tests.get("suppressed")) and kept(mmvp_tests.get("easy")))
    return {"seeds": [s for r in per_seed for s in r["seeds"]], "models": models, "gains": gains,
            "intervals": pooled_intervals(per_seed), "tests": tests,
            "suppressed": {str(r["seeds"][0]): r["comparison"]["suppressed"] for r in per_seed},
            "easy": {str(r["seeds"][0]): r["comparison"]["easy"] for r in per_seed},
            "persistent": {str(r["seeds"][0]): r["comparison"].get("persistent")  # None: no baseline run
                           for r in per_seed},
            "required_met": required, "beats_baseline": beats_baseline(per_seed, tests), "config": first["config"]}


def claim(test: dict | None) -> bool:
    """A gain that counts: at least GAIN points, its 95% interval above 0."""
    return bool(test) and test["diff"] >= GAIN and test["low"] > 0


def kept(test: dict | None) -> bool:
    """No loss beyond MARGIN points: the 95% interval of the difference stays above -MARGIN."""
    return bool(test) and test["low"] > -MARGIN


def beats_baseline(per_seed: list[dict], tests: dict) -> bool:
    """Part two: in every seed the baseline keeps a hard attribute suppressed and MCL keeps the easy
    ones (>= EASY); pooled over seeds MCL beats the baseline on the persistent ones (`claim`) and
    the ensemble on the suppressed ones (its interval above 0)."""
    persistent = tests.get("mcl - baseline", {}).get("mmvp", {}).get("persistent")
    vs_ensemble = tests.get("mcl - ensemble", {}).get("mmvp", {}).get("suppressed")
    return bool(vs_ensemble and vs_ensemble["low"] > 0 and claim(persistent)
                and all(r["comparison"].get("persistent") and r["comparison"]["easy"]
                        and r["comparison"]["mcl_easy_min"] >= EASY for r in per_seed))


def _seed_outcomes(per_seed: list[dict], kind: str, name: str) -> list[dict] | None:
    """Every seed's {group: [0/1...]} of one model and evaluation; None unless every seed has them."""
    found = [r.get("outcomes", {}).get(kind, {}).get(name) for r in per_seed]
    if not all(found):
        return None
    seeds = [{g: O.unpack(bits) for g, bits in f.items()} for f in found]
    shape = {g: len(v) for g, v in seeds[0].items()}
    for r, s in zip(per_seed, seeds):
        if {g: len(v) for g, v in s.items()} != shape:
            raise UsageError(f"{kind} outcomes of {name} in seed {r['seeds'][0]} are not on the items of seed "
                             f"{per_seed[0]['seeds'][0]}: evaluate every seed on the same benchmark")
    return seeds


def pooled_intervals(per_seed: list[dict]) -> dict:
    """{evaluation: {model: {group: {"score", "low", "high", "seeds"}, ["average"]}}}, pooled over seeds."""
    out: dict = {}
    kinds = dict.fromkeys(k for r in per_seed for k in r.get("outcomes", {}))
    for kind in kinds:
        for name in dict.fromkeys(n for r in per_seed for n in r.get("outcomes", {}).get(kind, {})):
            seeds = _seed_outcomes(per_seed, kind, name)
            if seeds is None:
                continue
            rec = {g: S.pooled_score(seeds, [[g]] * len(seeds)) for g in seeds[0]}
            if kind in AVERAGED:
                rec["average"] = S.pooled_score(seeds)
            out.setdefault(kind, {})[name] = rec
    return out


def _mcnemar(a: dict, b: dict, groups: list[str]) -> dict | None:
    if not groups:
        return None
    return S.mcnemar_exact([v for g in groups for v in a[g]], [v for g in groups for v in b[g]])


def pooled_tests(per_seed: list[dict]) -> dict:
    """{"A - B": {evaluation: {group | "average" | "suppressed" | "easy" | "persistent": {"diff",
    "low", "high", "p", "seeds", "mcnemar": [each seed's exact test on those items]}}}} for the
    compared pairs every seed has; the MMVP groups of patterns are each seed's own."""
    out: dict = {}
    for a_name, b_name in COMPARED:
        for kind in dict.fromkeys(k for r in per_seed for k in r.get("outcomes", {})):
            a, b = _seed_outcomes(per_seed, kind, a_name), _seed_outcomes(per_seed, kind, b_name)
            if a is None or b is None:
                continue
            sets = {g: [[g]] * len(a) for g in a[0]}
            if kind in AVERAGED:
                sets["average"] = [list(a[0])] * len(a)
            if kind == "mmvp":
                for group in ("suppressed", "easy", "persistent"):
                    lists = [r["comparison"].get(group) for r in per_seed]
                    if all(x is not None for x in lists):
                        sets[group] = lists
            rec = {}
            for label, groups in sets.items():
                test = S.pooled(a, b, groups)
                if test is not None:
                    test["mcnemar"] = [_mcnemar(x, y, g) for x, y, g in zip(a, b, groups)]
                rec[label] = test
            out.setdefault(f"{a_name} - {b_name}", {})[kind] = rec
    return out


def _fmt(stat) -> str:
    if stat is None:
        return "-"
    return f"{stat['mean']:.1f}" + (f" ± {stat['std']:.1f}" if stat.get("std") else "")


def model_names(summary: dict) -> list[str]:
    """The summary's models in report order: the methods, then MCL's stages."""
    return [n for n in (*METHODS, *sorted(n for n in summary["models"] if n.startswith("stage")))
            if n in summary["models"]]


def run_stage_dirs(run_dir: Path) -> list[Path]:
    """The stage folders of a run, in order."""
    return sorted(p for p in run_dir.glob("stage*") if p.is_dir())


def write_markdown(path: Path, parts: list[str]) -> Path:
    """`parts` as lines of a Markdown file, written atomically."""
    with atomic_output(path, "w") as f:
        f.write("\n".join(parts) + "\n")
    return path


def table(summary: dict) -> str:
    """The per-pattern MMVP table (mean ± std over seeds), as Markdown."""
    names = model_names(summary)
    patterns = list(summary["models"]["mcl"]["mmvp"])
    lines = ["| model | " + " | ".join(patterns) + " |", "|---" * (len(patterns) + 1) + "|"]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(_fmt(summary["models"][n]["mmvp"].get(p)) for p in patterns) + " |")
    return "\n".join(lines)


def _p(p: float, space: str = "") -> str:
    """'p=0.002', or 'p<=0.0001' at the bootstrap's floor."""
    text = S.fmt_p(p, S.RESAMPLES)
    return f"p{space}{text[:2]}{space}{text[2:]}" if text.startswith("<=") else f"p{space}={space}{text}"


def _test_line(test: dict | None) -> str:
    """'+18.3 points, 95% interval [6.0, 31.0], p = 0.0004 (McNemar per seed: 0.001, 0.2, 0.03)'."""
    if not test:
        return "not measured"
    seeds = ", ".join("-" if m is None else S.fmt_p(m["p"]) for m in test.get("mcnemar", []))
    return (f"{test['diff']:+.1f} points, 95% interval [{test['low']:.1f}, {test['high']:.1f}], "
            f"{_p(test['p'], ' ')} (exact McNemar per seed: {seeds})")


def verdict(summary: dict) -> list[str]:
    g, tests = summary["gains"], summary.get("tests", {})
    lines = [f"suppressed by plain CLIP after one stage (stage1 <= {SUPPRESSED:.0f}): "
             + "; ".join(f"seed {s}: {', '.join(p) or 'none'}" for s, p in summary["suppressed"].items()),
             f"easy (stage1 >= {EASY:.0f}): "
             + "; ".join(f"seed {s}: {', '.join(p) or 'none'}" for s, p in summary["easy"].items())]
    for other in ("ensemble", "baseline"):
        if f"gain_vs_{other}_suppressed" in g:
            mmvp = tests.get(f"mcl - {other}", {}).get("mmvp", {})
            lines.append(f"MCL - {other} on the suppressed attributes: {_test_line(mmvp.get('suppressed'))}; "
                         f"on the easy ones: {_test_line(mmvp.get('easy'))} (mean ± std over seeds: "
                         f"{_fmt(g[f'gain_vs_{other}_suppressed'])} and {_fmt(g[f'gain_vs_{other}_easy'])})")
    measured = bool(tests)  # results kept without per-item outcomes have no tests
    lines.append(f"required (MCL beats the equal-size ensemble on the suppressed attributes by >= {GAIN:.0f} points "
                 f"with its 95% interval above 0, and the interval of its difference on the easy ones stays above "
                 f"-{MARGIN:.0f}): "
                 f"{'met' if summary['required_met'] else 'NOT met' if measured else 'not measured (no outcomes)'}")
    persistent = summary.get("persistent", {})
    lines.append(f"still suppressed by plain CLIP after all the steps (baseline <= {SUPPRESSED:.0f}): "
                 + "; ".join(f"seed {s}: {'no baseline run' if p is None else ', '.join(p) or 'none'}"
                             for s, p in persistent.items()))
    if g.get("gain_vs_baseline_persistent"):
        test = tests.get("mcl - baseline", {}).get("mmvp", {}).get("persistent")
        lines.append(f"MCL - baseline on those: {_test_line(test)} "
                     f"(mean ± std over seeds: {_fmt(g['gain_vs_baseline_persistent'])})")
    lines.append(f"MCL beats plain CLIP at equal steps (a hard attribute the baseline keeps suppressed, MCL >= "
                 f"{GAIN:.0f} points better there with its 95% interval above 0, easy ones >= {EASY:.0f}, and better "
                 f"than the ensemble on the suppressed ones, interval above 0): "
                 f"{'yes' if summary.get('beats_baseline') else 'no' if measured else 'not measured (no outcomes)'}")
    return lines


def interval_table(summary: dict, kind: str, names: list[str] | None = None) -> str:
    """One evaluation's pooled scores with their 95% intervals (a row per model), then the
    differences of the compared pairs with their intervals and p-values (a row per pair)."""
    per_model = summary.get("intervals", {}).get(kind, {})
    if not per_model:
        return "(not measured)"
    names = [n for n in (names or per_model) if n in per_model]
    groups = list(per_model[names[0]])
    lines = ["| model | " + " | ".join(g.removeprefix("wds/") for g in groups) + " |", "|---" * (len(groups) + 1) + "|"]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(S.fmt_interval(per_model[n].get(g)) for g in groups) + " |")
    for label, per_kind in summary.get("tests", {}).items():
        rec = per_kind.get(kind)
        if rec:
            lines.append(f"| **{label}** | " + " | ".join(
                "-" if not rec.get(g) else
                f"{S.fmt_interval(rec[g], 'diff', True)} {_p(rec[g]['p'])}"
                for g in groups) + " |")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> Path:
    """MMVP per pattern and model: the pooled scores with their 95% intervals (mean ± std over
    seeds when the seeds kept no outcomes), and the chance line."""
    from eval.plots import plot_intervals

    names = [n for n in (*METHODS, "stage1") if n in summary["models"]]
    title = f"MCL vs plain CLIP, {len(summary['seeds'])} seed(s)"
    pooled = summary.get("intervals", {}).get("mmvp", {})
    if all(n in pooled for n in names):
        models = {n: pooled[n] for n in names}
    else:
        models = {n: {p: {"score": st["mean"], "low": st["mean"] - st["std"], "high": st["mean"] + st["std"]}
                      for p, st in summary["models"][n]["mmvp"].items() if st} for n in names}
        title = title.replace("seed(s)", "seed(s), mean ± std")
    return plot_intervals(models, path, title, "MMVP pairs correct (%)", S.CHANCE_MMVP)


def _probe_table(per_seed: list[dict]) -> str:
    models = per_seed[0]["models"]
    names = [n for n in models if models[n]["probe"]]
    if not names:
        return "(no probes)"
    attrs = list(models[names[0]]["probe"])
    lines = ["| model | " + " | ".join(f"{a} (chance {models[names[0]]['probe'][a]['chance']:.0f})" for a in attrs)
             + " |", "|---" * (len(attrs) + 1) + "|"]
    for n in names:
        cells = []
        for a in attrs:
            lin = statistics.fmean(r["models"][n]["probe"][a]["linear"] for r in per_seed)
            zs = statistics.fmean(r["models"][n]["probe"][a]["zero_shot"] for r in per_seed)
            cells.append(f"{lin:.0f} / {zs:.0f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _zeroshot_table(per_seed: list[dict]) -> str:
    """Each model's main CLIP_benchmark metric per set (%, mean over seeds)."""
    models = per_seed[0]["models"]
    names = [n for n in models if models[n].get("zeroshot")]
    if not names:
        return "(no zero-shot sets)"
    first = models[names[0]]["zeroshot"]
    sets = list(first)
    lines = ["| model | " + " | ".join(f"{d.removeprefix('wds/')} ({main_metric(first[d])[0]})" for d in sets) + " |",
             "|---" * (len(sets) + 1) + "|"]
    for n in names:
        cells = [f"{100 * statistics.fmean(main_metric(r['models'][n]['zeroshot'][d])[1] for r in per_seed):.0f}"
                 for d in sets]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _purity_table(stage_dirs: list[Path]) -> str:
    stats = [(d.name, _read(StageDir(d).assign_stats)) for d in stage_dirs]
    stats = [(n, s) for n, s in stats if s.get("purity")]
    if not stats:
        return "(no clustered stage)"
    attrs = list(stats[0][1]["purity"])
    lines = ["| stage (K) | " + " | ".join(attrs) + " |", "|---" * (len(attrs) + 1) + "|"]
    for name, s in stats:
        lines.append(f"| {name} ({s['k']}) | " + " | ".join(
            f"{100 * s['purity'][a]:.0f}% (NMI {s['nmi'][a]:.2f})" for a in attrs) + " |")
    return "\n".join(lines)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _training_table(stage_dirs: list[Path]) -> str:
    """Per MCL stage: the mean loss over the first and over the last tenth of its steps, and the
    loader's batches (pure, mixed, emitted early at the cap, fallback samples)."""
    lines = ["| stage | loss first -> last | mean effective negatives | pure | mixed | early | fallback samples |",
             "|---|---|---|---|---|---|---|"]
    for d in stage_dirs:
        rows = _jsonl(StageDir(d).metrics)  # one line per step: a resume trims it back (pipeline.trainer.log)
        if not rows:
            continue
        tenth = max(1, len(rows) // 10)
        first = statistics.fmean(r["loss"] for r in rows[:tenth])
        last = statistics.fmean(r["loss"] for r in rows[-tenth:])
        negatives = statistics.fmean(r.get("effective_negatives", 0) for r in rows)
        epochs = {r["epoch"]: r for r in _jsonl(StageDir(d).loader_stats)}  # an epoch's last record counts
        counts = {k: sum(r.get(k, 0) for r in epochs.values())
                  for k in ("pure_batches", "mixed_batches", "early_batches", "fallback_samples")}
        cells = [str(counts[k]) for k in counts] if epochs else ["-"] * 4
        lines.append(f"| {d.name} | {first:.2f} -> {last:.2f} | {negatives:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


INTERVALS = ("Each cell: the mean over seeds with its bootstrap 95% interval, items (pairs within each pattern) "
             "and seeds resampled together (eval.stats). Rows in bold: the paired difference of two models on "
             "the same items with its interval and the bootstrap p-value of no difference; the verdict above "
             "adds each seed's exact McNemar test. A score of 0 or 100 in every seed has an interval of zero "
             "width (every resample alike), which is not certainty. Chance is 25.")


def write_report(out: Path, summary: dict, per_seed: list[dict], mcl_runs: dict[int, Path]) -> Path:
    """OUT/summary.json, OUT/mmvp.png and OUT/report.md (links are relative to OUT)."""
    write_json(out / "summary.json", summary, sort_keys=False)
    plot(summary, out / "mmvp.png")
    seed, mcl = next(iter(mcl_runs.items()))
    stages = run_stage_dirs(mcl)
    grids = [StageDir(d).grid for d in stages if StageDir(d).grid.is_file()]
    names = model_names(summary)
    seeds = f"pooled over {len(summary['seeds'])} seed(s)"
    parts = [
        "# MCL demo report", "",
        f"Seeds: {', '.join(map(str, summary['seeds']))}. MMVP-style pair accuracy (%), mean ± std over seeds; "
        "chance is 25 and a model that cannot tell the two images apart scores near 0.", "",
        table(summary), "", *[f"- {line}" for line in verdict(summary)], "",
        f"### MMVP with 95% intervals and paired tests ({seeds})", "", INTERVALS, "",
        interval_table(summary, "mmvp", names), "",
        "![MMVP per pattern](mmvp.png)", "",
        f"## SugarCrepe-format benchmark: the caption against one with an attribute replaced ({seeds})", "",
        "Share of samples where the model scores the image higher with its caption than with the negative "
        "caption (chance 50); one category per attribute; average over the categories.", "",
        interval_table(summary, "sugarcrepe", names), "",
        "## Attribute probes (held-out shards): linear probe / zero-shot accuracy (%)", "",
        _probe_table(per_seed), "",
        f"Linear probe with 95% intervals over the test samples ({seeds}):", "",
        interval_table(summary, "probe", names), "",
        "## Zero-shot on the world's held-out sets (CLIP_benchmark; %, mean over seeds)", "",
        "Classification: one set per attribute, classes named as captions name them, top-1 accuracy; "
        "retrieval (captions): image recall@5. Per-model files: each run's eval/zeroshot.csv and zeroshot.png.", "",
        _zeroshot_table(per_seed), "",
        f"With 95% intervals over the items ({seeds}): what MCL costs where plain CLIP is good is the rows "
        "of differences on the easy attributes' sets and on retrieval.", "",
        interval_table(summary, "zeroshot", names), "",
        f"## Clusters of the MCL stages (seed {seed}): purity per attribute", "",
        "Purity: the share of samples whose attribute value is their cluster's most common one.", "",
        _purity_table(stages), "",
        f"## Training of the MCL stages (seed {seed}): loss and the loader's batches", "",
        "Stage 1 trains on random batches; later stages on batches of one cluster of the stage before "
        "(pure), or mixed where a group ran short.", "",
        _training_table(stages), "",
        *[f"![{g.parent.parent.name} clusters]({g.relative_to(out)})\n" for g in grids],
    ]
    return write_markdown(out / "report.md", parts)
