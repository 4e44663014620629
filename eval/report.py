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
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from common.io import atomic_output, write_json
from eval.mmvp import SUMMARY_NAME
from eval.probes import RECORD_NAME
from eval.zeroshot import SUMMARY_NAME as ZEROSHOT_NAME
from eval.zeroshot import main_metric
from pipeline.stage import RunDir, StageDir

SUPPRESSED, EASY = 35.0, 90.0
METHODS = ("baseline", "ensemble", "mcl")


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def seed_results(runs: dict[str, Path], seed: int, config: dict) -> dict:
    """{"models": {name: {"mmvp", "probe", "zeroshot"}}, "seeds", "config", "comparison"} of one seed;
    runs maps each method to its run folder (its eval/ holds mmvp_summary.json, probes.json and
    zeroshot_summary.json)."""
    models = {}
    for method, run_dir in runs.items():
        evals = RunDir(run_dir).eval_dir
        mmvp, probe, zeroshot = _read(evals / SUMMARY_NAME), _read(evals / RECORD_NAME), _read(evals / ZEROSHOT_NAME)
        models[method] = {"mmvp": mmvp.get(method, {}), "probe": probe.get(method, {}),
                          "zeroshot": zeroshot.get(method, {})}
        if method == "mcl":
            for name in (n for n in mmvp if n.startswith("stage")):
                models[name] = {"mmvp": mmvp[name], "probe": probe.get(name, {}), "zeroshot": zeroshot.get(name, {})}
    return {"models": models, "seeds": [seed], "config": config, "comparison": compare(models)}


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
    gain = gains.get("gain_vs_ensemble_suppressed")
    easy = gains.get("gain_vs_ensemble_easy")
    required = bool(gain and easy and all(r["comparison"]["shows_suppression"] for r in per_seed)
                    and gain["mean"] >= 10 and easy["mean"] >= -5
                    and (len(per_seed) < 2 or gain["mean"] - gain["std"] > 5))
    return {"seeds": [s for r in per_seed for s in r["seeds"]], "models": models, "gains": gains,
            "suppressed": {str(r["seeds"][0]): r["comparison"]["suppressed"] for r in per_seed},
            "easy": {str(r["seeds"][0]): r["comparison"]["easy"] for r in per_seed},
            "persistent": {str(r["seeds"][0]): r["comparison"].get("persistent")  # None: no baseline run
                           for r in per_seed},
            "required_met": required, "beats_baseline": beats_baseline(per_seed, gains), "config": first["config"]}


def beats_baseline(per_seed: list[dict], gains: dict) -> bool:
    """Part two: in every seed the baseline keeps a hard attribute suppressed and MCL keeps the easy
    ones (>= EASY); over seeds MCL beats the baseline on the persistent ones by >= 10 points with
    mean - std > 5, and beats the ensemble on the suppressed ones."""
    gain, vs_ensemble = gains.get("gain_vs_baseline_persistent"), gains.get("gain_vs_ensemble_suppressed")
    return bool(gain and vs_ensemble and vs_ensemble["mean"] > 0
                and all(r["comparison"].get("persistent") and r["comparison"]["easy"]
                        and r["comparison"]["mcl_easy_min"] >= EASY for r in per_seed)
                and gain["mean"] >= 10 and (len(per_seed) < 2 or gain["mean"] - gain["std"] > 5))


def _fmt(stat) -> str:
    if stat is None:
        return "-"
    return f"{stat['mean']:.1f}" + (f" ± {stat['std']:.1f}" if stat.get("std") else "")


def table(summary: dict) -> str:
    """The per-pattern MMVP table (mean ± std over seeds), as Markdown."""
    names = [n for n in (*METHODS, *sorted(n for n in summary["models"] if n.startswith("stage")))
             if n in summary["models"]]
    patterns = list(summary["models"]["mcl"]["mmvp"])
    lines = ["| model | " + " | ".join(patterns) + " |", "|---" * (len(patterns) + 1) + "|"]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(_fmt(summary["models"][n]["mmvp"].get(p)) for p in patterns) + " |")
    return "\n".join(lines)


def verdict(summary: dict) -> list[str]:
    g = summary["gains"]
    lines = [f"suppressed by plain CLIP after one stage (stage1 <= {SUPPRESSED:.0f}): "
             + "; ".join(f"seed {s}: {', '.join(p) or 'none'}" for s, p in summary["suppressed"].items()),
             f"easy (stage1 >= {EASY:.0f}): "
             + "; ".join(f"seed {s}: {', '.join(p) or 'none'}" for s, p in summary["easy"].items())]
    for other in ("ensemble", "baseline"):
        if f"gain_vs_{other}_suppressed" in g:
            lines.append(f"MCL - {other}: suppressed {_fmt(g[f'gain_vs_{other}_suppressed'])} points, "
                         f"easy {_fmt(g[f'gain_vs_{other}_easy'])} points")
    lines.append("required (MCL beats the equal-size ensemble by >= 10 on the suppressed attributes, loses <= 5 "
                 f"on the easy one, mean gain - std > 5 over seeds): {'met' if summary['required_met'] else 'NOT met'}")
    persistent = summary.get("persistent", {})
    lines.append(f"still suppressed by plain CLIP after all the steps (baseline <= {SUPPRESSED:.0f}): "
                 + "; ".join(f"seed {s}: {'no baseline run' if p is None else ', '.join(p) or 'none'}"
                             for s, p in persistent.items()))
    if g.get("gain_vs_baseline_persistent"):
        lines.append(f"MCL - baseline on those: {_fmt(g['gain_vs_baseline_persistent'])} points")
    lines.append(f"MCL beats plain CLIP at equal steps (a hard attribute the baseline keeps suppressed, MCL >= 10 "
                 f"points better there with mean - std > 5, easy ones >= {EASY:.0f}, and better than the ensemble): "
                 f"{'yes' if summary.get('beats_baseline') else 'no'}")
    return lines


def plot(summary: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt
    import numpy as np

    from eval.plots import save_png

    names = [n for n in (*METHODS, "stage1") if n in summary["models"]]
    patterns = list(summary["models"]["mcl"]["mmvp"])
    x, width = np.arange(len(patterns)), 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(1.4 * len(patterns) + 2, 4))
    for i, n in enumerate(names):
        st = [summary["models"][n]["mmvp"][p] or {"mean": 0, "std": 0} for p in patterns]
        ax.bar(x + i * width - 0.4 + width / 2, [s["mean"] for s in st], width, yerr=[s["std"] for s in st],
               capsize=2, label=n)
    ax.axhline(25, color="black", linestyle="dotted", linewidth=1)
    ax.set_xticks(x, patterns, rotation=20, ha="right")
    ax.set_ylabel("MMVP pairs correct (%)  dotted: chance")
    ax.set_ylim(0, 100)
    ax.set_title(f"MCL vs plain CLIP, {len(summary['seeds'])} seed(s)")
    ax.legend(fontsize=8)
    return save_png(fig, path)


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


def write_report(out: Path, summary: dict, per_seed: list[dict], mcl_runs: dict[int, Path]) -> Path:
    """OUT/summary.json, OUT/mmvp.png and OUT/report.md (links are relative to OUT)."""
    write_json(out / "summary.json", summary, sort_keys=False)
    plot(summary, out / "mmvp.png")
    seed, mcl = next(iter(mcl_runs.items()))
    stage_dirs = sorted(p for p in mcl.glob("stage*") if p.is_dir())
    grids = [StageDir(d).grid for d in stage_dirs if StageDir(d).grid.is_file()]
    parts = [
        "# MCL demo report", "",
        f"Seeds: {', '.join(map(str, summary['seeds']))}. MMVP-style pair accuracy (%), mean ± std over seeds; "
        "chance is 25 and a model that cannot tell the two images apart scores near 0.", "",
        table(summary), "", *[f"- {line}" for line in verdict(summary)], "",
        "![MMVP per pattern](mmvp.png)", "",
        "## Attribute probes (held-out shards): linear probe / zero-shot accuracy (%)", "",
        _probe_table(per_seed), "",
        "## Zero-shot on the world's held-out sets (CLIP_benchmark; %, mean over seeds)", "",
        "Classification: one set per attribute, classes named as captions name them, top-1 accuracy; "
        "retrieval (captions): image recall@5. Per-model files: each run's eval/zeroshot.csv and zeroshot.png.", "",
        _zeroshot_table(per_seed), "",
        f"## Clusters of the MCL stages (seed {seed}): purity per attribute", "",
        "Purity: the share of samples whose attribute value is their cluster's most common one.", "",
        _purity_table(stage_dirs), "",
        f"## Training of the MCL stages (seed {seed}): loss and the loader's batches", "",
        "Stage 1 trains on random batches; later stages on batches of one cluster of the stage before "
        "(pure), or mixed where a group ran short.", "",
        _training_table(stage_dirs), "",
        *[f"![{g.parent.parent.name} clusters]({g.relative_to(out)})\n" for g in grids],
    ]
    with atomic_output(out / "report.md", "w") as f:
        f.write("\n".join(parts) + "\n")
    return out / "report.md"
