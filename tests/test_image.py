"""Image-only MCL (SimCLR stages): the masked NT-Xent loss, the views, the models, caption-less
shards, training on 2 ranks with resume, and a whole 2-stage run probed."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, run_cli
from test_train import _torchrun, kill_and_resume
from pipeline.trainer.ntxent import MaskedNTXentLoss

COMMON = ["modality=image", "model=simclr-tiny-cnn", "batch_size=32", "warmup=2", "lr=2e-3", "log_every=4",
          "threads=1"]


def _views(n=12, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    b = F.normalize(a + 0.5 * torch.randn(n, d, generator=g), dim=-1)
    return a, b, torch.tensor(2.0)


def _reference(a, b, scale, labels=None, valid=None):
    """NT-Xent written out anchor by anchor: views 0..n-1 are a, n..2n-1 are b; anchor i's softmax
    runs over its positive and the views of other valid samples with its label."""
    views = torch.cat([a, b])
    n = len(a)
    sample = list(range(n)) * 2
    total, anchors = 0.0, 0
    for i in range(2 * n):
        si = sample[i]
        if valid is not None and not valid[si]:
            continue
        pos = (i + n) % (2 * n)
        cols = [pos] + [j for j in range(2 * n) if j not in (i, pos) and (valid is None or valid[sample[j]])
                        and (labels is None or labels[sample[j]] == labels[si])]
        logits = torch.stack([scale * views[i] @ views[j] for j in cols])
        total = total - torch.log_softmax(logits, 0)[0]
        anchors += 1
    return total / anchors


def test_unmasked_loss_is_simclrs_nt_xent_with_2n_minus_2_negatives():
    a, b, scale = _views()
    fn = MaskedNTXentLoss()
    loss = fn(a, b, scale)
    torch.testing.assert_close(loss, _reference(a, b, scale), rtol=1e-5, atol=1e-6)
    # SimCLR's own formulation: 2N x 2N similarities, the diagonal out, cross-entropy to the other view
    z = torch.cat([a, b])
    sim = (z @ z.T * scale).fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(12, 24), torch.arange(12)])
    torch.testing.assert_close(loss, F.cross_entropy(sim, target), rtol=1e-5, atol=1e-6)
    assert fn.last_effective_negatives == 22.0


def test_cross_label_views_never_reach_the_softmax_and_invalid_samples_take_no_part():
    a, b, scale = _views(seed=1)
    labels = torch.tensor([0, 0, 1, 1, 0, 2, 1, 0, 2, 2, 0, 1])
    fn = MaskedNTXentLoss()
    torch.testing.assert_close(fn(a, b, scale, labels=labels), _reference(a, b, scale, labels.tolist()),
                               rtol=1e-5, atol=1e-6)
    # label 0 has 5 samples: 10 views, less the anchor and its positive: 8 negatives
    sizes = torch.bincount(labels)[labels].float()
    assert fn.last_effective_negatives == pytest.approx(float((2 * sizes - 2).mean()))
    b2 = b.clone()
    b2[3] = torch.randn(16)  # an invalid sample's views change nothing
    valid = torch.arange(12) != 3
    loss = fn(a, b2, scale, labels=labels, valid=valid)
    torch.testing.assert_close(loss, _reference(a, b, scale, labels.tolist(), valid.tolist()), rtol=1e-5, atol=1e-6)
    keep = [i for i in range(12) if i != 3]
    torch.testing.assert_close(loss, _reference(a[keep], b[keep], scale, labels[keep].tolist()), rtol=1e-5, atol=1e-6)


def _two_rank_worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    a, b, scale = _views(seed=3)
    sl = slice(rank * 6, rank * 6 + 6)
    labels = torch.tensor([0, 0, 1, 1, 0, 2, 1, 0, 2, 2, 0, 1])
    out = {}
    for local_loss in (False, True):
        for name, kw in [("plain", {}), ("labels", {"labels": labels[sl]}),
                         ("invalid", {"labels": labels[sl], "valid": (torch.arange(12) != 1)[sl]})]:
            x, y = a[sl].clone().requires_grad_(), b[sl].clone().requires_grad_()
            loss = MaskedNTXentLoss(local_loss=local_loss, rank=rank, world_size=2)(x, y, scale, **kw)
            loss.backward()
            out[local_loss, name] = (loss.detach(), x.grad, y.grad)
    results[rank] = out
    torch.distributed.destroy_process_group()


def test_two_ranks_gather_views_and_labels_and_match_the_direct_loss():
    from test_loss import _free_port

    ctx = torch.multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        torch.multiprocessing.start_processes(_two_rank_worker, args=(_free_port(), results),
                                              nprocs=2, start_method="spawn")
        results = dict(results)
    a, b, scale = _views(seed=3)
    labels = [0, 0, 1, 1, 0, 2, 1, 0, 2, 2, 0, 1]
    valid = [i != 1 for i in range(12)]
    for name, kw in [("plain", {}), ("labels", {"labels": labels}), ("invalid", {"labels": labels, "valid": valid})]:
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        whole = _reference(x, y, scale, **kw)
        whole.backward()
        # local loss: each rank's anchors; with as many valid anchors on each rank, their mean is the whole loss
        if name != "invalid":
            mean = (results[0][True, name][0] + results[1][True, name][0]) / 2
            torch.testing.assert_close(mean, whole.detach(), rtol=1e-5, atol=1e-6)
        # global: each rank computes the whole batch's loss; its samples' gradients come back from both ranks'
        # losses (the gather's backward sums them), and DDP's mean over the 2 ranks makes them the whole's
        for r in (0, 1):
            loss, grad_a, grad_b = results[r][False, name]
            torch.testing.assert_close(loss, whole.detach(), rtol=1e-5, atol=1e-6)
            sl = slice(r * 6, r * 6 + 6)
            torch.testing.assert_close(grad_a / 2, x.grad[sl], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(grad_b / 2, y.grad[sl], rtol=1e-4, atol=1e-6)
            for i in (0, 1):  # the local loss's gradients (summed by the gather, averaged by DDP) are the same
                if name != "invalid":
                    torch.testing.assert_close(results[r][True, name][1 + i], (grad_a, grad_b)[i],
                                               rtol=1e-4, atol=1e-6)


def test_views_are_torchvision_transforms_by_name_and_bad_ones_name_the_item():
    from PIL import Image
    from torchvision import transforms as T

    from pipeline.loader.views import TwoViews, augmentations

    default = augmentations(None, 32)
    assert isinstance(default[0], T.RandomResizedCrop) and default[0].size == (32, 32)
    assert isinstance(default[2], T.RandomApply) and default[2].p == 0.8
    two = TwoViews([{"RandomAffine": {"degrees": 0, "translate": [0.2, 0.2]}}], 16)
    torch.manual_seed(0)
    out = two(Image.new("RGB", (40, 40), (200, 10, 10)).resize((40, 40)))
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.uint8
    for views, message in [([{"NoSuchTransform": {}}], "views[0]: 'NoSuchTransform' is not a torchvision"),
                           (["RandomHorizontalFlip", {"ColorJitter": {"brightness": 0.4}, "p": 2}],
                            "views[1]: p must be between 0 and 1"),
                           ([{"RandomAffine": {"degree": 3}}], "views[0]: RandomAffine(")]:
        with pytest.raises(ValueError, match=__import__("re").escape(message)):
            augmentations(views, 32)
    from pipeline.trainer.config import ConfigError, train_config

    with pytest.raises(ConfigError, match="views: the transforms fail on a PIL image"):
        train_config({"data": "x", "out": "y", "modality": "image", "views": [{"RandomErasing": {"p": 1.0}}]})
    with pytest.raises(ConfigError, match="views: applies to modality: image only"):
        train_config({"data": "x", "out": "y", "views": ["RandomHorizontalFlip"]})


@pytest.mark.parametrize("arch,width", [("simclr-tiny-cnn", 128), ("simclr-tiny-vit", 96), ("simclr-resnet18", 512)])
def test_image_models_save_load_and_start_from_weights(tmp_path, arch, width):
    from pipeline import models

    model, train_pre, pre, tok = models.create(arch)
    assert train_pre is None and tok(["a", "b"]).shape == (2, 0)
    x = torch.randn(3, 2, 3, 32, 32)
    model.eval()
    a, b, scale = model(x)
    assert a.shape == b.shape and torch.allclose(a.norm(dim=-1), torch.ones(3))
    assert scale.item() == pytest.approx(2.0)  # 1 / temperature 0.5, the scale the loss multiplies by
    torch.testing.assert_close(MaskedNTXentLoss()(a, b, scale), _reference(a, b, torch.tensor(2.0)))
    feats = model.encode_image(x[:, 0])
    assert feats.shape == (3, width)
    cfg = models.model_config(arch)
    models.save_model(model, arch, cfg, tmp_path / "saved")
    loaded = models.load(str(tmp_path / "saved"))
    torch.testing.assert_close(loaded.model.encode_image(x[:, 0]), feats)
    assert models.is_image_only("", str(tmp_path / "saved")) and models.is_image_only(arch)
    # a backbone's weights alone start a new model's backbone
    torch.save(model.backbone.state_dict(), tmp_path / "backbone.pt")
    started, *_ = models.create(arch, pretrained=str(tmp_path / "backbone.pt"))
    torch.testing.assert_close(started.eval().encode_image(x[:, 0]), feats)


def test_caption_less_samples_are_good_only_where_captions_are_not_read(tmp_path, tiny_spec):
    from shards.generate import generate
    from shards.reader import ProblemLog, read_samples
    from shards.validate import validate

    generate(tmp_path, tiny_spec, 20, 10, seed=0, progress=False, captions=False)
    problems = ProblemLog(logger=None)
    assert list(read_samples(str(tmp_path), problems, decode=False)) == []
    assert problems.counts["missing_caption"] == 20
    good = list(read_samples(str(tmp_path), ProblemLog(), decode=False, captions=False))
    assert len(good) == 20 and all(s["text"] == "" for s in good)
    assert validate(str(tmp_path), progress=False, captions=False)["samples"] == 20
    assert validate(str(tmp_path), progress=False)["problem_counts"] == {"missing_caption": 20}


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory, tiny_spec):
    """The tiny world's 600 samples as image-only shards (no .txt)."""
    from shards.generate import generate

    out = tmp_path_factory.mktemp("image_shards")
    generate(out, tiny_spec, 600, 200, seed=0, progress=False, captions=False)
    return out


def _metrics(stage):
    return [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]


def test_two_rank_image_training_masks_across_ranks_and_reports_to_dashboards(tmp_path, image_shards):
    # (DeepSpeed: engine=deepspeed runs the same; its engine test is test_train's, this one costs two minutes)
    stage = tmp_path / "ddp"
    r = _torchrun(f"data={image_shards}", f"out={stage}", "steps=12", "workers=1", "save_every=6",
                  "labels=json:attributes.count", "report_to=tensorboard", *COMMON)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = _metrics(stage)
    assert len(rows) == 12 and rows[-1]["loss"] < rows[0]["loss"], [x["loss"] for x in rows]
    # global batch 64 (128 views) over 2 ranks, masked to same-count samples (2 counts): about 62 negatives, not 126
    assert all(45 < x["effective_negatives"] < 85 for x in rows), [x["effective_negatives"] for x in rows]
    assert rows[0]["logit_scale"] == pytest.approx(2.0)  # 1 / temperature, not learned
    done = json.loads((stage / "done.json").read_text())
    assert done["config"]["modality"] == "image" and not done["data_problems"]
    saved = json.loads((stage / "model" / "open_clip_config.json").read_text())
    assert saved["model_cfg"]["modality"] == "image"
    assert list((stage / "tensorboard").glob("events.out.tfevents.*"))


def test_a_killed_image_run_resumes_to_the_same_losses(tmp_path, image_shards):
    args = [f"data={image_shards}", "steps=16", "workers=2", "save_every=4", *COMMON]
    a, b = kill_and_resume(tmp_path, args, 8, 16)  # each view's augmentation is seeded by its sample
    assert len(a) == len(b) == 16 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4, list(zip(a, b))


def test_a_clip_model_in_an_image_run_and_text_benchmarks_are_refused_in_one_line(tmp_path, image_shards):
    from common.cli import UsageError
    from launch.config import run_config
    from pipeline.train import main

    with pytest.raises(UsageError, match="model: 'mcl-tiny-vit' is a CLIP model; modality: image needs an image-only"):
        main([f"data={image_shards}", f"out={tmp_path / 's'}", "modality=image", "model=mcl-tiny-vit", "steps=2"])
    with pytest.raises(UsageError, match="caption_dedup: does not apply to modality: image"):
        main([f"data={image_shards}", f"out={tmp_path / 's'}", "modality=image", "model=simclr-tiny-cnn",
              "caption_dedup=true"])
    cfg = {"run_dir": str(tmp_path / "run"), "data": str(image_shards), "modality": "image",
           "mmvp": str(tmp_path), "train": {"model": "mcl-tiny-vit"}, "embed": {"tower": "both"}}
    with pytest.raises(UsageError) as exc:
        run_config(cfg, "run.json")
    for part in ("mmvp: needs a text tower", "embed.tower: an image-only model has only an image tower",
                 "train.model: mcl-tiny-vit is a CLIP model, the run's modality is image"):
        assert part in str(exc.value), str(exc.value)
    assert "\n" not in str(exc.value)
    with pytest.raises(UsageError, match="train.modality: the run's `modality` key sets every stage's"):
        run_config({**cfg, "mmvp": None, "embed": {}, "train": {"model": "simclr-tiny-cnn", "modality": "clip"}},
                   "run.json")


def test_a_whole_two_stage_image_run_on_caption_less_shards_is_merged_and_probed(tmp_path, image_shards, tiny_spec):
    from shards.generate import generate

    probe = tmp_path / "probe"
    generate(probe, tiny_spec, 200, 200, seed=1_000_003, progress=False)
    cfg = {"run_dir": str(tmp_path / "run"), "data": str(image_shards), "probes": str(probe), "modality": "image",
           "stages": 2, "clusters": 4, "stage_init": "scratch",
           "train": {"model": "simclr-tiny-cnn", "batch_size": 32, "steps": 8, "warmup": 2, "lr": 2e-3, "workers": 1,
                     "threads": 1, "log_every": 4, "save_every": 8,
                     "views": [{"RandomAffine": {"degrees": 0, "translate": [0.06, 0.06]}}]},
           "executor": {"name": "local", "timeout_min": 10, "tasks": 1}}
    (tmp_path / "run.json").write_text(json.dumps(cfg))
    r = run_cli("launch", "run", "--config", str(tmp_path / "run.json"))
    assert r.returncode == 0, r.stderr[-4000:]
    run = tmp_path / "run"
    stage2 = json.loads((run / "stage2" / "train_config.json").read_text())
    assert stage2["modality"] == "image" and stage2["labels"] == f"sidecars:{run / 'stage1'}"
    stats = [json.loads(line) for line in (run / "stage2" / "loader_stats.jsonl").read_text().splitlines()]
    assert stats[-1]["pure_batches"] > 0  # batches of one stage-1 cluster
    probes = json.loads((run / "eval" / "probes.json").read_text())
    assert list(probes) == ["mcl", "stage1", "stage2"]
    for per in probes.values():
        assert set(per) == {a.kind for a in tiny_spec.attributes}
        assert all(set(r) >= {"linear", "knn", "chance"} and "zero_shot" not in r for r in per.values())
    from pipeline import models

    merged = models.load(str(run / "merged.pt"))
    x = torch.randn(2, 3, 32, 32)
    stage_feats = [F.normalize(models.load(str(run / s / "model")).model.encode_image(x), dim=-1)
                   for s in ("stage1", "stage2")]
    torch.testing.assert_close(merged.model.encode_image(x), F.normalize(torch.cat(stage_feats, -1), dim=-1))
    assert merged.tokenizer(["x"]).shape == (1, 0)


def _seed(seed, mcl_count, mcl_bg, n=100):
    """A seed's results as eval.image_report.seed_results makes them: probe accuracies and per-item outcomes
    (the first k of n test samples right) of baseline, ensemble, mcl and MCL's stages."""
    from eval import image_report as IR
    from eval.outcomes import pack

    chance = {"background": 25.0, "count": 50.0, "shape": 33.33}
    acc = {"baseline": {"background": 90, "count": 52, "shape": 34}, "ensemble": {"background": 92, "count": 55,
                                                                                   "shape": 35},
           "mcl": {"background": mcl_bg, "count": mcl_count, "shape": 36},
           "stage1": {"background": 88, "count": 51, "shape": 60}, "stage2": {"background": 40, "count": 95,
                                                                              "shape": 36}}
    models = {m: {"linear": dict(a), "knn": dict(a), "chance": chance} for m, a in acc.items()}
    bits = {m: {attr: pack([1] * int(v) + [0] * (n - int(v))) for attr, v in a.items()} for m, a in acc.items()}
    return {"models": models, "outcomes": {"probe": bits, "probe_knn": bits}, "seeds": [seed], "config": {},
            "comparison": IR.compare(models)}


def test_the_image_report_finds_the_suppressed_attribute_and_states_the_verdict_in_the_issues_terms(tmp_path):
    from eval import image_report as IR

    first = _seed(0, 80, 88)
    # stage 1 (plain SimCLR) chooses: count 51 is 2% of the way from chance 50 to 100, shape 60 is 40%
    assert first["comparison"]["suppressed"] == ["count"] and first["comparison"]["easy"] == ["background"]
    assert first["comparison"]["gains"]["baseline/linear"]["suppressed"] == 28
    summary = IR.summarize([_seed(0, 80, 90), _seed(1, 70, 89), _seed(2, 75, 92)])
    gain = summary["gains"]["baseline/linear"]["suppressed"]
    assert gain["mean"] == pytest.approx(23) and gain["std"] == pytest.approx(5)
    assert summary["required_met"]  # 23 >= 10, 23 - 5 > 5, interval above 0; background +0.3, interval above -5
    test = summary["tests"]["mcl - baseline"]["linear"]["count"]
    assert test["diff"] == pytest.approx(23) and test["low"] > 0 and len(test["mcnemar"]) == 3
    assert summary["tests"]["mcl - baseline"]["linear"]["suppressed"]["diff"] == pytest.approx(23)
    # the easy attribute lost by more than 5 points on average: not met; a gain too spread: not met
    assert not IR.summarize([_seed(0, 80, 80), _seed(1, 80, 84), _seed(2, 80, 86)])["required_met"]
    assert not IR.summarize([_seed(0, 53, 90), _seed(1, 75, 90), _seed(2, 60, 90)])["required_met"]  # 13 +- 12
    per_seed = [_seed(s, 80, 90) for s in range(2)]
    summary = IR.summarize(per_seed)
    path = IR.write_report(tmp_path, summary, per_seed, {0: tmp_path / "no-run"})
    text = path.read_text()
    assert "| mcl | 90.0 | 80.0 | 36.0 |" in text and "required (" in text and ": met" in text
    assert "exact McNemar per seed: " in text and "### kNN probe (k=20)" in text
    assert (tmp_path / "probes.png").stat().st_size > 0 and (tmp_path / "summary.json").is_file()


def test_the_image_demo_writes_a_caption_less_world_and_three_image_runs(tmp_path):
    from common.cli import UsageError
    from launch.demo import IMAGE, IMAGE_QUICK, choose, load_config, make_world, method_configs

    config, out = choose(None, False, None, None, "image")
    assert Path(config).resolve() == REPO / IMAGE[0] and out == IMAGE[1] == "runs/demo-image"
    config, _ = choose(None, True, None, str(tmp_path / "q"), "image")
    assert Path(config).resolve() == REPO / IMAGE_QUICK[0]
    with pytest.raises(UsageError, match="--modality image has its own world"):
        choose("fading", False, None, None, "image")
    cfg = load_config(config)
    paths = make_world(config, cfg["data"], tmp_path / "out", 1, text_benchmarks=False)
    assert set(paths) == {"train", "probe"}
    import tarfile

    with tarfile.open(sorted(paths["train"].glob("*.tar"))[0]) as tf:
        names = tf.getnames()
    assert any(n.endswith(".jpg") for n in names) and not any(n.endswith(".txt") for n in names)
    runs = method_configs(cfg["run"], paths, tmp_path / "seed0", 0)
    assert {m: (c.modality, c.stages, c.mmvp) for m, c in runs.items()} == {
        "mcl": ("image", 2, None), "ensemble": ("image", 2, None), "baseline": ("image", 1, None)}
    assert runs["baseline"].train["steps"] == 24 and runs["mcl"].probes == str(paths["probe"])
