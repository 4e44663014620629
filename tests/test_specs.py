"""Every job's parameters are written once, in its spec; "done" is one rule for every job.

The spec a job's command line builds equals the one launch's plan builds from a run config;
a parameter flipped on a finished run makes exactly that job not done, and a dry run plans it
and every step after it."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import shutil

import pytest

from common.spec import fields, option, to_argv
from conftest import REPO
from launch.steps import JOBS


class _Parsed(Exception):
    """Raised instead of parsing: carries the parser a job's main built."""


def _parser_of(module, argv=("--help",)) -> argparse.ArgumentParser:
    original = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        raise _Parsed(self)

    argparse.ArgumentParser.parse_args = capture
    try:
        module.main(list(argv))
    except _Parsed as got:
        return got.args[0]
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"{module.__name__}.main built no parser")


def _options(p: argparse.ArgumentParser) -> set[str]:
    return {o for action in p._actions for o in action.option_strings}


def _spec_class(name: str):
    return getattr(importlib.import_module(JOBS[name][0]), name)


@pytest.mark.parametrize("name", [n for n in JOBS if n != "TrainConfig"])
def test_a_jobs_command_line_options_are_its_spec_fields(name):
    cls = _spec_class(name)
    p = _parser_of(importlib.import_module(JOBS[name][0]))
    want = {"-h", "--help"}
    for f in fields(cls):
        want.add(option(f.name))
        if f.type == "bool":  # --x / --no-x
            want.add("--no-" + f.name.replace("_", "-"))
    assert _options(p) == want
    for f in fields(cls):  # the spec's help line is the option's
        assert f.metadata["help"] and any(f.metadata["help"] in (a.help or "") for a in p._actions), f.name


def test_the_train_command_line_takes_the_train_configs_fields_and_nothing_else(capsys):
    from pipeline import train
    from pipeline.trainer.config import TrainConfig

    assert _options(_parser_of(train)) == {"-h", "--help", "--config", "--print-config"}
    assert train.main(["--print-config", "data=x", "out=y"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {f.name for f in fields(TrainConfig)}
    with pytest.raises(Exception, match="nosuchkey: unknown key"):
        train.main(["data=x", "out=y", "nosuchkey=1"])


@pytest.fixture()
def planned(tmp_path, tiny_shards, monkeypatch):
    """The plan of a fine-tune run config (stage 0 saved, 2 trained stages, every job) with a
    value set in each job's section."""
    from launch.config import load_run_config
    from launch.run import plan

    for var in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"):
        monkeypatch.delenv(var, raising=False)
    cfg = load_run_config(str(REPO / "configs" / "tiny_mcl.yaml"), [
        f"run_dir={tmp_path / 'run'}", f"data={tiny_shards}", "mmvp=", f"probes={tiny_shards}",
        "train.pretrained=openai", "train.quick_gelu=true", "cluster.niter=7", "cluster.seed=3",
        "embed.batch_size=64", "embed.workers=0", "embed.tower=both", "reduce.grid_per_cluster=3",
        "reduce.batch_sizes=[8, 16]", "merge.per_stage_norm=false", "executor.tasks=2",
        "train.max_fallback=1", "later.bucket=stream", "regroup.chunk_steps=3"])
    steps = plan(cfg)
    for step in steps:  # what a job's command line checks exists
        if type(step.calls[0]).__name__ == "EmbedSpec":
            (tmp_path / "run" / step.name.split("/")[0] / "model").mkdir(parents=True, exist_ok=True)
    return cfg, steps


def test_the_spec_of_every_step_from_the_run_config_equals_the_one_its_command_line_builds(planned, monkeypatch):
    from launch.config import RunConfig

    cfg, steps = planned
    assert [s.name for s in steps] == [
        "stage0/save", "stage0/embed", "stage0/cluster", "stage0/assign", "stage0/reduce", "stage1/train",
        "stage1/embed", "stage1/cluster", "stage1/assign", "stage1/reduce", "stage1/regroup", "stage2/train", "merge",
        "eval"]
    seen = set()
    for step in steps:
        for spec in step.calls:
            name = type(spec).__name__
            seen.add(name)
            module_name, entry = JOBS[name]
            module = importlib.import_module(module_name)
            got = []
            monkeypatch.setattr(module, entry, lambda s, *a, **k: got.append(s))
            if name == "TrainConfig":
                argv = [f"{k}={json.dumps(v)}" for k, v in dataclasses.asdict(spec).items()]
            else:
                argv = to_argv(spec)
            module.main(argv)
            assert got == [spec], (step.name, argv)
    assert seen == set(JOBS)
    # the run config's values reached the specs; what it did not set is the spec's own default
    by_name = {s.name: s.calls for s in steps}
    cluster, embed = by_name["stage1/cluster"][0], by_name["stage1/embed"]
    assert (cluster.niter, cluster.seed, cluster.k) == (7, 3, 4)
    assert cluster.sample_size is None and cluster.spherical is True  # ClusterSpec's defaults
    assert [(e.task, e.tasks, e.batch_size, e.workers, e.tower) for e in embed] == [(0, 2, 64, 0, "both"),
                                                                                   (1, 2, 64, 0, "both")]
    assert by_name["stage1/reduce"][0].batch_sizes == (8, 16) and by_name["stage1/reduce"][0].grid_per_cluster == 3
    regroup = by_name["stage1/regroup"]  # for stage 2's W x B, where stage 2 reads it
    assert [(r.task, r.tasks, r.chunk_steps, r.world_size, r.batch_size) for r in regroup] == [(0, 2, 3, 1, 32),
                                                                                              (1, 2, 3, 1, 32)]
    assert by_name["stage2/train"][0].regrouped == regroup[0].out == str(cfg.run_dir) + "/stage1/regrouped"
    assert by_name["merge"][0].per_stage_norm is False
    assert by_name["stage0/save"][0].quick_gelu is True
    # no job parameter has a second default in the run config
    from launch.config import JOB_SECTIONS, spec_class
    tunable = {f.name for section, (_, managed) in JOB_SECTIONS.items() for f in fields(spec_class(section))
               if f.name not in managed}
    run_fields = {f.name for f in dataclasses.fields(RunConfig)}
    assert not tunable & run_fields and not [f for f in run_fields if f.startswith(tuple(s + "_" for s in JOB_SECTIONS))
                                             and f not in JOB_SECTIONS]
    assert all(RunConfig.__dataclass_fields__[s].default_factory() == {} for s in JOB_SECTIONS)


def test_an_earlier_run_configs_keys_are_read_into_their_sections(tmp_path, tiny_shards):
    from launch.config import run_config

    cfg = run_config({"run_dir": str(tmp_path), "data": str(tiny_shards), "tower": "text", "cluster_niter": 5,
                      "cluster_sample_size": 100, "per_stage_norm": False}, "old.yaml", check=False)
    assert cfg.embed == {"tower": "text"} and cfg.cluster == {"niter": 5, "sample_size": 100}
    assert cfg.merge == {"per_stage_norm": False}


# a flip of one result parameter per job, and the run config override that makes it
FLIPS = {
    "stage1/train": ({"lr": 0.123}, "train.lr=0.123"),
    "stage1/embed": ({"tower": "text"}, "embed.tower=text"),
    "stage1/cluster": ({"niter": 3}, "cluster.niter=3"),
    "stage1/assign": ({"stage_index": 7}, None),  # the run sets all of assign's parameters
    "stage1/reduce": ({"grid_per_cluster": 2}, "reduce.grid_per_cluster=2"),
    "merge": ({"per_stage_norm": False}, "merge.per_stage_norm=false"),
    "eval": ({"mmvp": None}, "mmvp="),
}


def test_a_flipped_parameter_undoes_exactly_its_job_and_a_dry_run_plans_it_and_the_later_steps(
        quick_demo, capsys):
    from launch.config import run_config
    from launch.run import plan, run

    run_dir = quick_demo[0] / "seed0" / "mcl"
    recorded = json.loads((run_dir / "run_config.json").read_text())
    steps = plan(run_config(recorded, "run_config.json", check=False))
    names = [s.name for s in steps]
    assert set(FLIPS) | {"stage2/train"} == set(names)
    assert all(s.done() for s in steps)
    for name, (change, override) in FLIPS.items():
        step = steps[names.index(name)]
        flipped = [dataclasses.replace(spec, **change) for spec in step.calls]
        assert not step.__class__(step.name, flipped).done(), name
        assert step.done(), name  # the finished run is untouched
        if override is None:
            continue
        from launch.config import load_run_config
        capsys.readouterr()
        run(load_run_config(str(run_dir / "run_config.json"), [override]), dry_run=True)
        lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("forecast")]
        states = [line.split()[1] for line in lines]
        first = names.index(name)
        assert states == ["done"] * first + ["would"] * (len(names) - first), (override, lines)


def test_a_rerun_of_merge_with_per_stage_norm_flipped_rewrites_the_artifact(quick_demo, tmp_path):
    import torch

    from pipeline import merge as M, models

    run_dir = quick_demo[0] / "seed0" / "mcl"
    copy = tmp_path / "mcl"
    for stage in ("stage1", "stage2"):
        shutil.copytree(run_dir / stage / "model", copy / stage / "model")
    spec = M.MergeSpec(stages=(str(copy / "stage1" / "model"), str(copy / "stage2" / "model")),
                       out=str(copy / "merged.pt"), names=("stage1", "stage2"))
    M.merge(spec)
    before = (copy / "merged.pt").read_bytes()
    assert M.is_done(spec)
    flipped = dataclasses.replace(spec, per_stage_norm=False)
    assert not M.is_done(flipped)
    M.merge(flipped)
    assert (copy / "merged.pt").read_bytes() != before
    assert torch.load(copy / "merged.pt", weights_only=True)["per_stage_norm"] is False
    assert M.is_done(flipped) and not M.is_done(spec)
    # a stage model retrained (other weights) undoes the merge too
    weights = copy / "stage2" / "model" / models.WEIGHTS_NAME
    state = torch.load(weights, weights_only=True)
    state["logit_scale"] = state["logit_scale"] + 1
    torch.save(state, weights)
    assert not M.is_done(flipped)



def test_a_spec_refuses_values_its_job_cannot_use_on_its_command_line_and_in_a_run_config(tmp_path, tiny_shards):
    from common.cli import UsageError
    from launch.config import load_run_config
    from pipeline.cluster import ClusterSpec
    from pipeline.reduce import ReduceSpec

    assert [p.split(":")[0] for p in ClusterSpec(stage="s", k=0, niter=0, seed=-1, sample_size=0).problems()] == [
        "k", "niter", "seed", "sample_size"]
    assert ClusterSpec(stage="s", k=2).problems() == [] and ReduceSpec(stage="s").problems() == []
    for override, message in (("cluster.niter=0", "cluster.niter: must be >= 1, got 0"),
                              ("reduce.grid_per_cluster=-1", "reduce.grid_per_cluster: must be >= 1, got -1"),
                              ("embed.batch_size=0", "embed.batch_size: must be >= 1, got 0"),
                              ("cluster.spherical=maybe", "cluster.spherical: expected true or false"),
                              ("cluster.nosuch=1", "cluster.nosuch: unknown key"),
                              ("cluster.k=3", "cluster.k: set by the run for each step")):
        with pytest.raises(UsageError, match=message):
            load_run_config(str(REPO / "configs" / "tiny_mcl.yaml"),
                            [f"run_dir={tmp_path}", f"data={tiny_shards}", "mmvp=", override])


def test_a_stage0_saved_before_records_is_done_and_keeps_its_weights(tmp_path):
    """A stage-0 folder saved without a record (an earlier version) is done for the same
    architecture and config, and a save there writes only the record: the weights' bytes,
    and so every fingerprint made from them, stay."""
    from pipeline import models
    from pipeline.save import RECORD_NAME, SaveSpec, is_done, save

    model, *_ = models.create("mcl-tiny-vit")
    out = tmp_path / "stage0" / "model"
    models.save_model(model, "mcl-tiny-vit", models.model_config("mcl-tiny-vit", "openai"), out)
    weights = (out / models.WEIGHTS_NAME).read_bytes()
    spec = SaveSpec(model="mcl-tiny-vit", pretrained="openai", out=str(out))
    assert is_done(spec) and not is_done(dataclasses.replace(spec, quick_gelu=True))
    save(spec)
    assert (out / RECORD_NAME).is_file() and (out / models.WEIGHTS_NAME).read_bytes() == weights and is_done(spec)
    assert not is_done(dataclasses.replace(spec, pretrained="laion2b_s34b_b79k"))
