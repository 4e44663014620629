"""The demo (the README's main command): MCL against plain CLIP on the synthetic world.

    python -m launch demo [--world persistent|fading | --quick | --config FILE] [--out DIR] [--seeds 0 1 2]
    python -m launch demo --modality image [--quick] [--seeds 0 1 2]

Two worlds (RESULTS.md): `persistent`, the default (configs/demo_persistent.yaml, out
runs/demo-persistent), where plain CLIP's suppression lasts for all the steps, and `fading`
(configs/demo.yaml, out runs/demo), where it is slowness; --quick is the tests' small variant.

`--modality image` is the paper's unimodal experiment (configs/demo_image.yaml, out
runs/demo-image; a config whose run section says `modality: image` is one too): image-only
SimCLR stages on the persistent world's images written without captions, plain SimCLR as
the baseline and the ensemble, MCL's same-cluster negatives, compared by the linear and kNN
probes per attribute (eval.image_report). Its world has no MMVP, SugarCrepe or zero-shot
sets: those need a text tower.

1. Generates the world of the config's `data` section: training shards, held-out probe
   shards, the MMVP-format benchmark (one pattern per attribute), a SugarCrepe-format set
   (a caption with one attribute replaced, one file per attribute) and, from the probe
   shards, CLIP_benchmark zero-shot sets (one classification set per attribute, one retrieval
   set), and validates them.
2. For each seed, runs three launch runs with the config's `run` section (local executor by
   default), in OUT/seed<S>/:
   - mcl: the MCL stages (clustering, sidecars, cluster-bucketed loader), merged;
   - ensemble: as many independently seeded plain CLIP stages, merged the same way (it
     separates the MCL effect from mere ensembling); its stage 1 is trained exactly like
     MCL's stage 1 (plain CLIP, same seed), so it is copied from there, not trained twice;
   - baseline: plain CLIP, one stage, as many steps as all MCL stages together.
   Each is evaluated on both benchmarks, with the attribute probes and on the zero-shot sets. The config's `parallel`
   (default 1) runs up to that many of the three side by side; the ensemble starts once
   MCL's stage 1 is trained.
3. Writes OUT/seed<S>/results.json, OUT/summary.json (mean and std over seeds; bootstrap
   intervals over pairs and seeds, paired differences with their p-values), OUT/mmvp.png and
   OUT/report.md, and prints the per-pattern table and the verdict (eval.report).
Every step is skipped when its outputs exist and check, so a rerun resumes and a finished
demo does no work.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import threading
import time
from pathlib import Path

from shards import world as W
from common.cli import UsageError
from shards.generate import generate
from common.io import project_file, read_yaml, write_json
from shards.mmvp_writer import write_benchmark
from shards.sugarcrepe_writer import write_sets as write_sugarcrepe
from shards.zeroshot_writer import write_sets
from shards.validate import validate

log = logging.getLogger("launch.demo")
WORLDS = {"persistent": ("configs/demo_persistent.yaml", "runs/demo-persistent"),
          "fading": ("configs/demo.yaml", "runs/demo")}
DEFAULT_WORLD = "persistent"
QUICK = ("configs/demo_quick.yaml", "runs/demo")
IMAGE = ("configs/demo_image.yaml", "runs/demo-image")
IMAGE_QUICK = ("configs/demo_image_quick.yaml", "runs/demo-image-quick")
MODALITIES = ("clip", "image")


def choose(world: str | None, quick: bool, config: str | None, out: str | None,
           modality: str = "clip") -> tuple[str, str]:
    """The demo config and run folder of the command line's --world / --quick / --config / --out
    / --modality."""
    if sum(bool(x) for x in (world, quick, config)) > 1:
        raise UsageError("--world, --quick and --config each choose the demo config: give one of them")
    if modality not in MODALITIES:
        raise UsageError(f"--modality: must be one of {list(MODALITIES)}, got {modality!r}")
    if modality == "image":
        if world:
            raise UsageError("--modality image has its own world (configs/demo_image.yaml); for another, give "
                             "--config with `modality: image` in its run section")
        default_config, default_out = IMAGE_QUICK if quick else IMAGE
    else:
        default_config, default_out = QUICK if quick else WORLDS[world or DEFAULT_WORLD]
    return str(project_file(config or default_config)), out or default_out


def modality(cfg: dict) -> str:
    """The demo's modality: its run section's (clip by default)."""
    return cfg["run"].get("modality", "clip")


def load_config(path: str | Path) -> dict:
    try:
        cfg = read_yaml(path, "config")
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if not isinstance(cfg, dict) or not isinstance(cfg.get("data"), dict) or not isinstance(cfg.get("run"), dict):
        raise UsageError(f"{path}: a demo config needs 'data' and 'run' sections")
    return cfg


def make_world(config: str | Path, data: dict, out: Path, workers: int, text_benchmarks: bool = True) -> dict:
    """Training shards (without captions when `data.captions` is false), probe shards and, with
    `text_benchmarks`, the MMVP, SugarCrepe and zero-shot sets under OUT/data; returns their paths."""
    try:
        spec = W.load_spec(str(project_file(data["world"])))
    except (KeyError, ValueError) as exc:
        raise UsageError(f"{config}: data.world: {exc}") from exc
    paths = {"train": out / "data" / "train", "probe": out / "data" / "probe"}
    seed = int(data.get("seed", 0))
    captions = bool(data.get("captions", True))
    log.info("generating %d training samples in %s%s", data["num_samples"], paths["train"],
             "" if captions else " (images only, no captions)")
    sizes = generate(paths["train"], spec, int(data["num_samples"]), int(data.get("samples_per_shard", 1000)),
                     seed, workers, captions=captions)
    probe_samples = int(data.get("probe_samples", 2000))
    generate(paths["probe"], spec, probe_samples, probe_samples, seed + 1_000_003, 1, progress=False)
    if text_benchmarks:
        paths.update(mmvp=out / "data" / "mmvp", zeroshot=out / "data" / "zeroshot",
                     sugarcrepe=out / "data" / "sugarcrepe")
        write_benchmark(paths["mmvp"], spec, int(data.get("mmvp_pairs", 15)), int(data.get("mmvp_seed", 1)))
        write_sugarcrepe(paths["sugarcrepe"], spec, int(data.get("sugarcrepe_samples", 100)),
                         int(data.get("sugarcrepe_seed", 2)))
        paths["benchmarks"] = [f"wds/{name}={folder}"
                               for name, folder in write_sets(str(paths["probe"]), paths["zeroshot"]).items()]
    record = paths["train"] / "validation.json"
    if record.exists():
        report = json.loads(record.read_text())
    else:
        report = validate(str(paths["train"]), decode=True, workers=workers, captions=captions)
        if report["problems"]:
            raise RuntimeError(f"{paths['train']}: generated shards have problems: {report['problem_counts']}")
        write_json(record, report)
    print(f"world: {report['samples']} training samples in {len(sizes)} shards at {paths['train']}; " + (
          f"benchmark {paths['mmvp']} with patterns {', '.join(a.pattern for a in spec.attributes)}"
          if text_benchmarks else f"probe shards {paths['probe']}"), flush=True)
    return paths


def method_configs(run: dict, paths: dict[str, Path], seed_dir: Path, seed: int) -> dict:
    """The three launch RunConfigs of one seed (validated)."""
    from launch.config import run_config, stage_train_config

    base = copy.deepcopy(run)
    base.update(data=str(paths["train"]), probes=str(paths["probe"]))
    if "mmvp" in paths:
        base.update(mmvp=str(paths["mmvp"]), sugarcrepe=str(paths["sugarcrepe"]), benchmarks=paths["benchmarks"])
    base["train"] = {**base.get("train", {}), "seed": 1000 * seed}  # stage seeds never overlap across seeds
    mcl = run_config({**base, "run_dir": str(seed_dir / "mcl"), "method": "mcl"}, "demo run (mcl)")
    ensemble = run_config({**base, "run_dir": str(seed_dir / "ensemble"), "method": "ensemble",
                           "stage_init": "scratch", "finetune": {}}, "demo run (ensemble)")
    total = sum(stage_train_config(mcl, s).steps for s in range(1, mcl.stages + 1))
    baseline = run_config({**base, "run_dir": str(seed_dir / "baseline"), "method": "ensemble", "name": "baseline",
                           "stages": 1, "stage_init": "scratch", "later": {}, "finetune": {},
                           "train": {**base["train"], "steps": total}}, "demo run (baseline)")
    return {"mcl": mcl, "ensemble": ensemble, "baseline": baseline}


def share_stage1(mcl, ensemble) -> None:
    """The ensemble's first member is MCL's stage 1 (same config but the folder): copy, don't retrain."""
    from launch.config import stage_train_config
    from pipeline.stage import RunDir

    src, dst = RunDir(mcl.run_dir).stage(1), RunDir(ensemble.run_dir).stage(1)
    a, b = stage_train_config(mcl, 1), stage_train_config(ensemble, 1)
    if dataclasses.replace(a, out="") != dataclasses.replace(b, out="") or not src.done.is_file() \
            or dst.done.exists():
        return
    skip = [p.name for p in (src.checkpoints, src.clusters_dir, src.sidecars_dir, src.embeddings_dir)]
    src, dst = src.path, dst.path
    tmp = dst.with_name("stage1.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(*skip))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


def run_methods(runs: dict, parallel: int, seed: int) -> None:
    """Runs the launch runs of mcl, baseline and ensemble, up to `parallel` of them side by side
    (each a launcher thread waiting on its jobs). The ensemble starts once MCL's stage 1, its
    shared first member, is trained (or MCL's run has ended). Daemon threads, joined with a
    timeout: Ctrl-C stops the demo at once (a rerun resumes)."""
    from launch.run import emit, run
    from pipeline.stage import RunDir

    slots, errors, threads = threading.Semaphore(parallel), {}, {}

    def launch(method: str) -> None:
        try:
            if method == "ensemble":
                stage1 = RunDir(runs["mcl"].run_dir).stage(1).done
                while not stage1.is_file() and threads["mcl"].is_alive():
                    time.sleep(2)
                share_stage1(runs["mcl"], runs["ensemble"])
            with slots:
                emit(f"--- seed {seed}: {method} in {runs[method].run_dir}")
                run(runs[method], label=method if parallel > 1 else None)
        except Exception as exc:  # noqa: BLE001 - reported for all methods below
            errors[method] = exc

    for method in ("mcl", "baseline", "ensemble"):
        threads[method] = threading.Thread(target=launch, args=(method,), name=f"launch-{method}", daemon=True)
        threads[method].start()
    for thread in threads.values():
        while thread.is_alive():
            thread.join(1)
    if errors:
        first = next(iter(errors.values()))
        message = "; ".join(f"seed {seed} {m}: {exc}" for m, exc in errors.items())
        if all(isinstance(e, UsageError) for e in errors.values()):
            raise UsageError(message) from first  # bad input or a run folder to fix: one line, exit 2
        raise RuntimeError(message) from first


def run_demo(config: str | Path, out: str | Path, workers: int = 1, seeds: list[int] | None = None) -> dict:
    cfg = load_config(config)
    if modality(cfg) == "image":
        from eval import image_report as report
    else:
        from eval import report

    parallel = cfg.get("parallel", 1)
    if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
        raise UsageError(f"{config}: parallel: must be an integer >= 1, got {parallel!r}")
    out = Path(out)
    paths = make_world(config, cfg["data"], out, workers, text_benchmarks=modality(cfg) != "image")
    seeds = seeds if seeds is not None else list(cfg.get("seeds", [0]))
    per_seed, mcl_runs = [], {}
    for seed in seeds:
        seed_dir = out / f"seed{seed}"
        runs = method_configs(cfg["run"], paths, seed_dir, seed)
        run_methods(runs, parallel, seed)
        result = report.seed_results({m: Path(c.run_dir) for m, c in runs.items()}, seed,
                                     {**cfg, "config_file": str(config)})
        write_json(seed_dir / "results.json", result, sort_keys=False, if_changed=True)
        per_seed.append(result)
        mcl_runs[seed] = Path(runs["mcl"].run_dir)
    summary = report.summarize(per_seed)
    path = report.write_report(out, summary, per_seed, mcl_runs)
    print(report.table(summary))
    for line in report.verdict(summary):
        print(line)
    print(f"report: {path}")
    return summary
