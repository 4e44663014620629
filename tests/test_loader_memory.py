"""Host memory of the training loader: uint8 batches normalised on the device give the model
the inputs the float32 path gave; workers and prefetch sized by the CPUs and the memory."""
from __future__ import annotations

import logging
import math
import os

import pytest
import torch

from pipeline import models
from pipeline.loader.build import resolve_loader
from pipeline.loader.images import DeviceNormalize, split_transform
from pipeline.loader.labels import no_labels
from pipeline.loader.memory import MAX_AUTO_WORKERS, auto_prefetch, auto_workers, batch_bytes, plan_loader, rank_cpus
from pipeline.loader.slot import TrainStream
from pipeline.loader.workers import make_loader
from pipeline.trainer.config import TrainConfig
from pipeline.trainer.throughput import Throughput
from shards.reader import expand_urls


@pytest.fixture(scope="module")
def transforms():
    _, pre_train, pre_val, tokenizer = models.create("mcl-tiny-vit", None)
    return {"train": pre_train, "eval": pre_val}, tokenizer


def _batches(tiny_shards, transform, tokenizer, workers=2):
    stream = TrainStream(expand_urls(str(tiny_shards)), transform, tokenizer, 16, 2, seed=3, shuffle_buffer=50,
                         labeler=no_labels)
    stream.set_epoch(0)
    return list(make_loader(stream, workers, seed=0, prefetch=2))


@pytest.mark.parametrize("kind", ["train", "eval"])
def test_uint8_batches_normalised_on_the_device_equal_the_float_path(tiny_shards, transforms, kind):
    """Real DataLoader workers over the tiny shards, the same seeds: the uint8 path's images,
    normalised as the train step does, are the float32 path's, bit for bit (ToTensor of a
    uint8 image is x / 255 in float32, then the same Normalize), with the train transform's
    random crops too."""
    found, tokenizer = transforms
    to_uint8, normalize = split_transform(found[kind])
    old = _batches(tiny_shards, found[kind], tokenizer)
    new = _batches(tiny_shards, to_uint8, tokenizer)
    assert len(old) == len(new) == 4
    for a, b in zip(old, new):
        assert b.images.dtype == torch.uint8 and a.images.dtype == torch.float32
        assert b.images.shape == a.images.shape and a.keys == b.keys and b.valid.all()
        assert b.images.nbytes * 4 == a.images.nbytes
        assert torch.equal(normalize(b.images), a.images)
        assert torch.equal(b.tokens, a.tokens)
    assert normalize(old[0].images) is old[0].images  # a float batch passes as it is


def test_split_refuses_a_transform_it_cannot_cut():
    from torchvision import transforms as T

    with pytest.raises(ValueError, match="cannot split"):
        split_transform(T.Compose([T.ToTensor()]))
    with pytest.raises(ValueError, match="cannot split"):
        split_transform(lambda img: img)
    norm = DeviceNormalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    assert torch.allclose(norm(x), torch.full((1, 3, 2, 2), 2.0))


def test_auto_workers_never_exceed_the_cpus(monkeypatch):
    for cpus in range(1, 65):
        w = auto_workers(cpus)
        assert 0 <= w < cpus and w <= MAX_AUTO_WORKERS
    assert auto_workers(12) == 11 and auto_workers(1) == 0 and auto_workers(64) == 16
    assert auto_workers() < max(2, len(os.sched_getaffinity(0)))
    assert rank_cpus() == len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})  # a 3-CPU Slurm task
    assert auto_workers() == 2
    cfg, plan = resolve_loader(TrainConfig(batch_size=8), (3, 32, 32))
    assert cfg.workers == plan.workers == 2 and plan.cpus == 3
    cfg, plan = resolve_loader(TrainConfig(batch_size=8, workers=5, prefetch_factor=3), (3, 32, 32))
    assert (cfg.workers, cfg.prefetch_factor) == (5, 3)  # set in the config: kept


def test_prefetch_is_what_the_memory_holds(caplog):
    per = batch_bytes(1000, (3, 224, 224))
    assert per == 1000 * 3 * 224 * 224 + 1000 * (8 * 77 + 17)
    assert batch_bytes(1000, (3, 224, 224), image_dtype=torch.float32) - per == 3 * 1000 * 3 * 224 * 224
    assert auto_prefetch(4.0, 11, per) == 2       # 11 x 2 x 151 MB = 3.3 GB
    assert auto_prefetch(4.0, 16, per) == 1       # never below one batch per worker
    assert auto_prefetch(4.0, 2, 64 * 3 * 32 * 32) == 4  # small batches: at most 4
    assert auto_prefetch(100.0, 16, per) == 4
    plan = plan_loader(None, None, 4.0, per, cpus=12)
    assert (plan.workers, plan.prefetch) == (11, 2) and plan.held_bytes <= 4e9
    assert plan.describe() == "loader: 11 workers (of 12 CPUs), prefetch 2 batches each: 3.3 GB host memory for batches"
    assert plan_loader(0, None, 4.0, per, cpus=12).prefetch is None
    with caplog.at_level(logging.INFO, logger="pipeline.train"):
        cfg, plan = resolve_loader(TrainConfig(batch_size=1000, loader_memory_gb=8.0), (3, 224, 224), cpus=12)
    assert (cfg.workers, cfg.prefetch_factor) == (11, 4)
    assert "loader: 11 workers (of 12 CPUs), prefetch 4 batches each: 6.7 GB host memory" in caplog.text


def test_bad_loader_values_are_config_errors():
    from pipeline.trainer.config import train_config, ConfigError

    base = {"data": "x.tar", "out": "o"}
    assert train_config(base).workers is None and train_config(base).prefetch_factor is None
    for key, value in (("prefetch_factor", 0), ("loader_memory_gb", 0), ("peak_tflops", -1.0), ("workers", -1)):
        with pytest.raises(ConfigError, match=key):
            train_config({**base, key: value})


def test_throughput_figures():
    t = Throughput(batch_size=100, flops=3e9, peak=1.0)
    t.epoch_start()
    for batch in t.timed(range(3)):
        t.step_done()
    window = t.take_window()
    assert 0 <= window["data_wait_share"] <= 1 and window["samples_per_s_per_device"] > 0
    assert math.isclose(window["mfu"], 3e9 * window["samples_per_s_per_device"] / 1e12)
    assert t.take_window() == {} and t.summary()["steps"] == 3
    assert Throughput(100).summary().get("mfu") is None
    cpu = Throughput(100, None, None)
    cpu.step_done()
    assert cpu.summary()["mfu"] is None and "MFU unknown" in cpu.describe()


def test_launch_forecasts_with_the_workers_a_training_task_will_run():
    """`workers: null` in a run config: the slot forecast counts the workers of a training
    task's CPUs (Slurm's cpus_per_task), not the login node's."""
    from types import SimpleNamespace

    from launch.config import SlurmConfig, train_workers

    slurm = SimpleNamespace(name="slurm", slurm=SlurmConfig(cpus_per_task=6))
    assert train_workers(SimpleNamespace(executor=slurm), TrainConfig()) == 5
    assert train_workers(SimpleNamespace(executor=slurm), TrainConfig(workers=3)) == 3
    local = SimpleNamespace(name="local", slurm=SlurmConfig())
    assert train_workers(SimpleNamespace(executor=local), TrainConfig()) == auto_workers()


def test_counting_flops_leaves_the_model_and_the_rng_as_they_were():
    from pipeline.trainer.throughput import flops_per_sample

    model, _, pre_val, tokenizer = models.create("mcl-tiny-vit", None)
    model.train()
    to_uint8, normalize = split_transform(pre_val)
    from pipeline.loader.decode import blank_image

    state = torch.get_rng_state()
    flops = flops_per_sample(model, normalize(blank_image(to_uint8).unsqueeze(0)), tokenizer(["a photo"]))
    assert flops > 0 and model.training and torch.equal(torch.get_rng_state(), state)
