"""The demo end to end in its quick variant: world, the three methods through launch, results.json,
the summary, the report and its charts; a rerun does no work. (The gain needs the full run: RESULTS.md.)"""
from __future__ import annotations

import json

import pytest

from conftest import rerun_quick_demo, run_cli

PATTERNS = ["Background", "Structural Character", "Quantity", "Spatial"]  # the tiny world's attributes


def test_quick_demo_runs_mcl_ensemble_and_baseline_and_reports(quick_demo):
    tmp_path, r = quick_demo
    assert "world: 600 training samples in 3 shards" in r.stdout
    assert (tmp_path / "data" / "mmvp" / "Questions.csv").read_text().count("\n") == 1 + 2 * 5 * len(PATTERNS)

    results = json.loads((tmp_path / "seed0" / "results.json").read_text())
    assert set(results) == {"models", "outcomes", "seeds", "config", "comparison"} and results["seeds"] == [0]
    assert list(results["models"]) == ["mcl", "stage1", "stage2", "ensemble", "baseline"]
    kinds = {f"replace_{a}" for a in ("background", "shape", "count", "position")}
    for name, rec in results["models"].items():
        assert list(rec["mmvp"]) == PATTERNS + ["average"], name
        assert all(0 <= v <= 100 for v in rec["mmvp"].values())
        assert set(rec["probe"]) == {"background", "shape", "count", "position"}, name
        assert all(set(v) == {"linear", "knn", "zero_shot", "chance", "intervals"} for v in rec["probe"].values())
        assert set(rec["sugarcrepe"]) == kinds | {"average"}, name  # the world's SugarCrepe-format set
        # every evaluation's per-item outcomes, as many as its items: 5 pairs a pattern, 20 samples a category
        outcomes = {kind: results["outcomes"][kind][name] for kind in ("mmvp", "sugarcrepe", "zeroshot", "probe")}
        assert {p: len(v) for p, v in outcomes["mmvp"].items()} == dict.fromkeys(PATTERNS, 5), name
        assert {c: len(v) for c, v in outcomes["sugarcrepe"].items()} == dict.fromkeys(sorted(kinds), 20), name
        assert 100 * outcomes["sugarcrepe"]["replace_count"].count("1") / 20 == rec["sugarcrepe"]["replace_count"]
        sets = {f"wds/{a}" for a in ("background", "shape", "count", "position", "captions")}
        assert set(rec["zeroshot"]) == sets, name  # the world's CLIP_benchmark sets
        assert 0 <= rec["zeroshot"]["wds/count"]["acc1"] <= 1 and "image_retrieval_recall@5" in rec["zeroshot"][
            "wds/captions"], name
    assert results["config"]["run"]["stages"] == 2
    comparison = results["comparison"]
    assert set(comparison["suppressed"]) | set(comparison["easy"]) <= set(PATTERNS)
    assert "gain_vs_ensemble_suppressed" in comparison and "gain_vs_baseline_easy" in comparison

    seed = tmp_path / "seed0"
    baseline = json.loads((seed / "baseline" / "stage1" / "train_config.json").read_text())
    stage2 = json.loads((seed / "mcl" / "stage2" / "train_config.json").read_text())
    assert baseline["steps"] == 2 * 12 and baseline["labels"] == "none"
    assert stage2["labels"].startswith("sidecars:") and stage2["pretrained"].endswith("stage1/model")
    assert stage2["lr"] == 2.0e-4  # the finetune section
    ensemble2 = json.loads((seed / "ensemble" / "stage2" / "train_config.json").read_text())
    assert ensemble2["labels"] == "none" and ensemble2["pretrained"] is None and ensemble2["seed"] == 1
    state = json.loads((seed / "ensemble" / "launch_state.json").read_text())
    assert "job_ids" not in state["stage1/train"] and state["stage2/train"]["job_ids"]  # member 1 = MCL stage 1
    # the three runs go side by side (parallel: 3); the ensemble waits for MCL's stage 1 only
    lines = r.stdout.splitlines()
    at = {key: next(i for i, line in enumerate(lines) if line.startswith(key)) for key in (
        "[mcl] stage1/train         running", "[baseline] stage1/train         running",
        "[mcl] stage1/train         finished", "[mcl] stage2/train         running",
        "[ensemble] stage2/train         running")}
    assert at["[baseline] stage1/train         running"] < at["[mcl] stage1/train         finished"], lines
    assert at["[mcl] stage1/train         running"] < at["[ensemble] stage2/train         running"] \
        < at["[mcl] stage2/train         running"], lines

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seeds"] == [0] and isinstance(summary["required_met"], bool)
    assert summary["models"]["mcl"]["mmvp"]["average"]["mean"] == results["models"]["mcl"]["mmvp"]["average"]
    tests = summary["tests"]
    assert set(tests) == {"mcl - ensemble", "mcl - baseline"}
    assert set(tests["mcl - baseline"]) == {"mmvp", "sugarcrepe", "zeroshot", "probe", "probe_knn"}
    assert {"average", "suppressed", "easy", "persistent"} <= set(tests["mcl - baseline"]["mmvp"])
    interval = summary["intervals"]["mmvp"]["mcl"]["average"]
    assert interval["low"] <= summary["models"]["mcl"]["mmvp"]["average"]["mean"] <= interval["high"]
    report = (tmp_path / "report.md").read_text()
    for part in ("| baseline |", "| ensemble |", "| mcl |", "| stage1 |", "mmvp.png", "purity", "Zero-shot",
                 "| model | background (acc1) |", "## SugarCrepe-format benchmark", "| **mcl - baseline** |",
                 "95% interval [", "exact McNemar per seed", "| model | replace_background |",
                 "seed0/mcl/stage1/clusters/grid.png"):
        assert part in report, part
    stage2_row = next(line for line in report.splitlines() if line.startswith("| stage2 | ") and "->" in line)
    pure = json.loads((tmp_path / "seed0" / "mcl" / "stage2" / "loader_stats.jsonl").read_text().splitlines()[-1])
    assert stage2_row.split(" | ")[3] == str(pure["pure_batches"]), stage2_row  # the loader table's pure count
    for png in ("mmvp.png", "seed0/mcl/stage1/clusters/grid.png", "seed0/mcl/eval/probes.png",
                "seed0/baseline/eval/zeroshot.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG", png
    assert "| mcl |" in r.stdout and "required (" in r.stdout

    stamps = {p: p.stat().st_mtime_ns for p in seed.rglob("*") if p.is_file() and p.name != "launch_state.json"
              and "logs" not in p.parts}
    r = rerun_quick_demo(tmp_path, "launch", "demo", "--quick", "--out", str(tmp_path), "--workers", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert " running " not in r.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_demo_config_errors_are_one_line(tmp_path):
    config = tmp_path / "demo.yaml"
    config.write_text("parallel: 0\ndata: {world: configs/worlds/tiny.yaml, num_samples: 10}\nrun: {stages: 2}\n")
    r = run_cli("launch", "demo", "--config", str(config), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and f"{config}: parallel: must be an integer >= 1, got 0" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def _seed(seed, stage1, baseline, mcl, ensemble, pairs=50):
    """One seed's results of MMVP scores (%): each model gets the first pairs of a pattern right."""
    from eval.report import compare

    patterns = ["Background", "Spatial", "Orientation"]
    scores = (("stage1", stage1), ("baseline", baseline), ("mcl", mcl), ("ensemble", ensemble))
    models = {name: {"mmvp": dict(zip(patterns, v))} for name, v in scores}
    outcomes = {name: {p: "1" * round(x * pairs / 100) + "0" * (pairs - round(x * pairs / 100))
                       for p, x in zip(patterns, v)} for name, v in scores}
    return {"models": models, "outcomes": {"mmvp": outcomes}, "seeds": [seed], "config": {},
            "comparison": compare(models)}


def test_the_report_rounds_each_mean_and_std_once():
    from eval.report import summarize, table

    runs = [_seed(s, (100, 10, 4), (100, 4, 2), (100, 90, o), (100, 8, 4)) for s, o in enumerate((86, 88, 88))]
    mcl = next(line for line in table(summarize(runs)).splitlines() if line.startswith("| mcl |"))
    assert mcl.endswith("| 87.3 ± 1.2 |")  # stdev 1.1547; rounded to 1.15 first, it showed 1.1


def test_mcl_is_compared_with_the_baseline_where_plain_clip_stays_suppressed():
    from eval.report import compare, summarize, verdict

    runs = [_seed(0, (100, 10, 4), (100, 4, 30), (100, 90, 20), (100, 8, 4)),
            _seed(1, (100, 14, 2), (100, 6, 50), (98, 80, 30), (100, 10, 2))]
    first = runs[0]["comparison"]
    assert first["suppressed"] == ["Spatial", "Orientation"] and first["persistent"] == ["Spatial", "Orientation"]
    assert first["gain_vs_baseline_persistent"] == (86 - 10) / 2 and first["mcl_easy_min"] == 100
    assert runs[1]["comparison"]["persistent"] == ["Spatial"]  # the baseline learned Orientation (50)
    summary = summarize(runs)
    assert summary["persistent"] == {"0": ["Spatial", "Orientation"], "1": ["Spatial"]}
    assert summary["gains"]["gain_vs_baseline_persistent"]["mean"] == (38 + 74) / 2 and summary["beats_baseline"]
    persistent = summary["tests"]["mcl - baseline"]["mmvp"]["persistent"]
    assert persistent["diff"] == (38 + 74) / 2 and 0 < persistent["low"] < 38 and persistent["p"] < 0.05
    # each seed's exact McNemar test on its persistent pairs; seed 0: MCL alone right on 45 - 2 Spatial
    # pairs, the baseline alone on 15 - 10 Orientation pairs
    from scipy.stats import binomtest
    assert persistent["mcnemar"][0] == {"a_only": 43, "b_only": 5, "p": pytest.approx(binomtest(5, 48).pvalue)}
    assert any("MCL beats plain CLIP at equal steps" in line and line.endswith("yes") for line in verdict(summary))
    assert any(line.startswith("MCL - baseline on those: +56.0 points, 95% interval [") for line in verdict(summary))

    lost_easy = [runs[0], _seed(1, (100, 14, 2), (100, 6, 50), (80, 80, 30), (100, 10, 2))]
    assert not summarize(lost_easy)["beats_baseline"]  # MCL lost the easy attribute (80 < 90)
    learned = [_seed(s, (100, 10, 4), (100, 90, 80), (100, 92, 84), (100, 8, 4)) for s in (0, 1)]
    assert summarize(learned)["persistent"] == {"0": [], "1": []} and not summarize(learned)["beats_baseline"]
    spread = [_seed(0, (100, 10, 4), (100, 4, 2), (100, 60, 2), (100, 8, 4)),
              _seed(1, (100, 10, 4), (100, 4, 2), (100, 4, 2), (100, 8, 4))]
    spread_summary = summarize(spread)  # gains 28 and 0: a draw of seed 1 twice (1 in 4) gives 0
    assert spread_summary["tests"]["mcl - baseline"]["mmvp"]["persistent"]["low"] == 0
    assert not spread_summary["beats_baseline"]
    unmeasured = [runs[0], _seed(1, (100, 14, 2), (100, 6, 50), (98, 80, 30), (100, 10, 2))]
    del unmeasured[1]["models"]["baseline"]  # a seed run without its baseline
    unmeasured[1]["comparison"] = compare(unmeasured[1]["models"])
    summary = summarize(unmeasured)
    assert summary["persistent"] == {"0": ["Spatial", "Orientation"], "1": None} and not summary["beats_baseline"]
    assert any(line.endswith("seed 0: Spatial, Orientation; seed 1: no baseline run") for line in verdict(summary))
    summary = summarize(unmeasured[::-1])  # the first seed without a baseline: the other's still counts
    assert summary["models"]["baseline"]["mmvp"]["Spatial"]["mean"] == 4
    assert summary["gains"]["gain_vs_baseline_persistent"]["mean"] == (86 - 10) / 2


def test_the_persistent_world_is_the_default_and_its_mcl_stages_start_from_scratch(quick_demo, tmp_path):
    from launch.config import stage_train_config
    from launch.demo import choose, load_config, method_configs
    from pipeline.models import model_config
    from shards.world import load_spec

    config, out = choose(None, False, None, None)
    assert (config, out) == ("configs/demo_persistent.yaml", "runs/demo-persistent")
    assert choose("persistent", False, None, "/tmp/x") == ("configs/demo_persistent.yaml", "/tmp/x")
    assert choose("fading", False, None, None) == ("configs/demo.yaml", "runs/demo")
    assert choose(None, True, None, None) == ("configs/demo_quick.yaml", "runs/demo")
    cfg = load_config(config)
    assert len(load_spec(cfg["data"]["world"]).attribute("background").values) == 64
    data = quick_demo[0] / "data"  # any valid shards: only the configs are built here
    cfg["run"]["train"]["batch_size"] = 8  # the quick world's 600 samples fill 64 clusters of 8
    cfg["run"]["train"]["max_fallback"] = 1.0  # about 9 samples a cluster: a fifth of them would fall back
    paths = {"train": data / "train", "probe": data / "probe", "mmvp": data / "mmvp", "sugarcrepe": data / "sugarcrepe",
             "benchmarks": []}
    runs = method_configs(cfg["run"], paths, tmp_path / "seed3", 3)
    mcl = [stage_train_config(runs["mcl"], s) for s in (1, 2)]
    assert runs["mcl"].stages == 2 and [c.steps for c in mcl] == [300, 900]  # the `later` section
    assert runs["mcl"].sugarcrepe == runs["baseline"].sugarcrepe == str(data / "sugarcrepe")
    assert [c.pretrained for c in mcl] == [None] * 2 and [c.seed for c in mcl] == [3000, 3001]
    assert [c.labels for c in mcl] == ["none", f"sidecars:{tmp_path}/seed3/mcl/stage1"]
    ensemble = [stage_train_config(runs["ensemble"], s) for s in (1, 2)]
    assert [(c.steps, c.seed, c.labels) for c in ensemble] == [(300, 3000, "none"), (900, 3001, "none")]
    baseline = stage_train_config(runs["baseline"], 1)
    assert baseline.steps == sum(c.steps for c in mcl) == 1200 and {baseline.lr, *(c.lr for c in mcl)} == {5e-4}
    assert {c.model for c in (baseline, *mcl, *ensemble)} == {cfg["run"]["train"]["model"]}  # one architecture
    # the 2-layer vision tower of configs/models/mcl-tiny-vit-d2.json keeps the demo within 20 minutes
    assert model_config(cfg["run"]["train"]["model"])["vision_cfg"]["layers"] == 2
    r = run_cli("launch", "demo", "--world", "persistent", "--quick", "--out", str(tmp_path / "q"))
    assert r.returncode == 2 and "give one of them" in r.stderr and not (tmp_path / "q").exists()
    r = run_cli("launch", "demo", "--world", "default", "--out", str(tmp_path / "q"))  # renamed: fading
    assert r.returncode == 2 and "invalid choice" in r.stderr and not (tmp_path / "q").exists()


def test_the_verdict_claims_a_gain_by_its_interval_and_needs_the_outcomes():
    from common.cli import UsageError
    from eval.report import claim, kept, summarize, verdict

    runs = [_seed(s, (100, 10, 4), (100, 40, 50), (100, 90, 60), (100, 8, 4)) for s in (0, 1)]
    summary = summarize(runs)
    suppressed = summary["tests"]["mcl - ensemble"]["mmvp"]["suppressed"]
    assert suppressed["diff"] == (82 + 56) / 2 and suppressed["low"] > 0 and summary["required_met"]
    assert summary["tests"]["mcl - ensemble"]["mmvp"]["easy"]["low"] == 0  # 100 against 100: kept
    assert any(line.endswith(": met") for line in verdict(summary))
    from eval.stats import interval  # two seeds alike: the seed draws change nothing, the pairs' interval remains
    assert summary["intervals"]["mmvp"]["mcl"]["Spatial"] == {**interval([[1] * 45 + [0] * 5]), "seeds": 2}
    # the thresholds: a gain of at least 10 points whose interval lies above 0; a loss whose interval stays above -5
    assert claim({"diff": 10.0, "low": 0.1}) and not claim({"diff": 9.9, "low": 5.0})
    assert not claim({"diff": 30.0, "low": 0.0}) and not claim(None)
    assert kept({"low": -4.9}) and not kept({"low": -5.0}) and not kept(None)
    lost = [_seed(s, (100, 10, 4), (100, 40, 50), (80, 90, 60), (100, 8, 4)) for s in (0, 1)]
    assert summarize(lost)["tests"]["mcl - ensemble"]["mmvp"]["easy"]["high"] < 0
    assert not summarize(lost)["required_met"]  # MCL lost 20 points on the easy attribute

    old = dict(runs[1])
    del old["outcomes"]  # a seed's results.json from before per-item outcomes were kept
    mixed = summarize([runs[0], old])
    assert mixed["tests"] == {} and not mixed["required_met"]
    assert any(line.endswith("not measured (no outcomes)") for line in verdict(mixed))
    other = _seed(1, (100, 10, 4), (100, 40, 50), (100, 90, 60), (100, 8, 4), pairs=40)
    with pytest.raises(UsageError, match="mmvp outcomes of mcl in seed 1 are not on the items of seed 0"):
        summarize([runs[0], other])
