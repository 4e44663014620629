"""Merge and evaluation: MMVP scoring with known answers, merge by hand, fresh-process load, probes."""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import REPO, run_cli
from eval.encoders import Encoder
from eval.mmvp import evaluate, write_outputs
from pipeline import models
from pipeline.merge import MergeSpec, merge as merge_job
from pipeline.merged_model import load_merged


def _write_fixture(root, plan):
    """The public layout; plan = {type: [(statement1, statement2), ...]}; image qid = red 10*qid."""
    rows, qid = [], 0
    for typ, pairs in plan.items():
        folder = root / "MLLM_VLM Images" / typ
        folder.mkdir(parents=True)
        for s1, s2 in pairs:
            for s in (s1, s2):
                qid += 1
                Image.new("RGB", (16, 16), (10 * qid, 0, 0)).save(folder / f"{qid}.jpg", quality=95)
                rows.append([qid, typ, s])
    with open(root / "Questions.csv", "w", newline="") as f:
        csv.writer(f).writerows([["Question ID", "Type", "Statement"], *rows])
    return root


class KnownAnswers(Encoder):
    """Image of qid q -> one-hot e_q; statement "matches q" -> e_q."""

    def __init__(self):
        super().__init__("known", None, None, None)

    def images(self, pils):
        ids = [round(np.asarray(p)[..., 0].mean() / 10) for p in pils]
        return F.one_hot(torch.tensor(ids), 32).float()

    def texts(self, texts):
        return F.one_hot(torch.tensor([int(t.split()[-1]) for t in texts]), 32).float()


def test_mmvp_scorer_gives_the_expected_per_pattern_numbers(tmp_path):
    plan = {
        "Orientation": [("matches 1", "matches 2"), ("matches 3", "matches 4")],     # both right: 100
        "Quantity": [("matches 5", "matches 5"), ("matches 8", "matches 7")],        # one / two wrong: 0
        "Spatial": [("matches 9", "matches 10"), ("matches 12", "matches 12"),       # right, wrong,
                    ("matches 13", "matches 14"), ("matches 16", "matches 15")],     # right, wrong: 50
    }
    data = _write_fixture(tmp_path / "mmvp", plan)
    results = evaluate(data, [KnownAnswers()])
    assert dict(results["known"]["patterns"]) == {"Orientation": 100.0, "Quantity": 0.0, "Spatial": 50.0,
                                                  "average": 50.0}
    pairs = results["known"]["pairs"]
    assert (pairs[2]["pred1"], pairs[2]["pred2"], pairs[2]["gt1"], pairs[2]["gt2"]) == ("img1", "img1", "img1", "img2")
    assert pairs[3]["pred1"] == "img2" and pairs[3]["q1score"] < 0.5
    summary = write_outputs(results, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "mmvp_summary.json").read_text()) == json.loads(json.dumps(summary))
    lines = (tmp_path / "out" / "mmvp_pairs.csv").read_text().splitlines()
    assert lines[0].startswith("model,type,qid1,qid2,pred1,pred2,gt1,gt2,q1score,q2score") and len(lines) == 9
    assert Image.open(tmp_path / "out" / "mmvp_patterns.png").size[0] > 300


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory):
    out = tmp_path_factory.mktemp("stages")
    dirs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model, *_ = models.create("mcl-tiny-vit")
        dirs.append(models.save_model(model, "mcl-tiny-vit", models.model_config("mcl-tiny-vit"),
                                      out / f"stage{seed}" / "model"))
    return dirs


def merge(stage_dirs, out, per_stage_norm=True):
    return merge_job(MergeSpec(stages=tuple(map(str, stage_dirs)), out=str(out), per_stage_norm=per_stage_norm))


@pytest.mark.parametrize("per_stage_norm", [True, False])
def test_merge_of_two_stages_is_the_concatenation(tmp_path, two_stages, per_stage_norm):
    path = merge(two_stages, tmp_path / "merged.pt", per_stage_norm=per_stage_norm)
    merged = load_merged(path)
    assert merged.names == ["stage1", "stage2"]
    a, _, pre, tok = models.create("", pretrained=str(two_stages[0]))
    b, *_ = models.create("", pretrained=str(two_stages[1]))
    x = torch.randn(3, 3, 32, 32)
    t = tok(["a photo of two red circles", "some shapes", "a blue background"])
    norm = F.normalize if per_stage_norm else (lambda v, dim: v)
    with torch.no_grad():
        want_i = F.normalize(torch.cat([norm(a.encode_image(x), dim=-1), norm(b.encode_image(x), dim=-1)], -1), dim=-1)
        want_t = F.normalize(torch.cat([norm(a.encode_text(t), dim=-1), norm(b.encode_text(t), dim=-1)], -1), dim=-1)
    torch.testing.assert_close(merged.encode_image(x), want_i, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged.encode_text(merged.tokenizer(["a photo of two red circles", "some shapes",
                                                                     "a blue background"])), want_t,
                               rtol=1e-5, atol=1e-6)
    assert merged.encode_image(x).shape == (3, 128)
    assert not any(p.requires_grad for p in merged.parameters())


def test_merged_artifact_loads_in_a_fresh_process_without_the_run(tmp_path, two_stages):
    run = tmp_path / "run"
    shutil.copytree(two_stages[0].parent.parent, run)
    merged_path = merge([run / "stage1" / "model", run / "stage2" / "model"], tmp_path / "elsewhere" / "m.pt")
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        expected = load_merged(merged_path).encode_image(x)
    torch.save(x, tmp_path / "x.pt")
    shutil.rmtree(run)
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(REPO)!r})
        from pipeline.merged_model import load_merged
        m = load_merged({str(merged_path)!r})
        x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
        from PIL import Image
        img = m.preprocess(Image.new("RGB", (64, 64), "red"))
        assert img.shape == (3, 32, 32)
        torch.save(m.encode_image(x), {str(tmp_path / 'y.pt')!r})
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "y.pt", weights_only=True), expected)


def test_mmvp_cli_compares_models_and_rejects_bad_input(tmp_path, two_stages, tiny_spec):
    from shards.mmvp_writer import write_benchmark
    bench = write_benchmark(tmp_path / "bench", tiny_spec, pairs=3, seed=1)
    merged = merge(two_stages, tmp_path / "merged.pt")
    r = run_cli("eval.mmvp", "--data", str(bench), "--model", f"mcl={merged}", "--model", f"s1={two_stages[0]}",
                "--model", f"same={two_stages[0]}", "--compare", "s1", "mcl", "same", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "mmvp_summary.json").read_text())
    assert list(summary) == ["mcl", "s1", "same"]
    assert list(summary["mcl"]) == [a.pattern for a in tiny_spec.attributes] + ["average"]
    assert "Background" in r.stdout and "mcl" in r.stdout and "s1 - mcl: " in r.stdout
    # the intervals and tests are those of eval.stats on the pairs' outcomes in mmvp_pairs.csv
    from eval import outcomes as O
    from eval import stats as S
    record = json.loads((tmp_path / "out" / "mmvp_stats.json").read_text())
    pairs = O.read(tmp_path / "out" / "mmvp_pairs.csv", "type")
    assert record["chance"] == 25.0 and list(record["comparisons"]) == ["s1 - mcl", "s1 - same"]
    assert record["models"]["mcl"] == S.intervals(pairs["mcl"])
    assert all(record["models"][n][p]["score"] == pytest.approx(summary[n][p], abs=0.005)
               for n in summary for p in summary[n])  # the summary keeps 2 decimals
    assert record["comparisons"]["s1 - mcl"] == S.paired(pairs["s1"], pairs["mcl"])
    same = record["comparisons"]["s1 - same"]  # one model under two names: no difference, p = 1
    assert all(r["diff"] == r["low"] == r["high"] == 0 and r["p"] == 1.0 for r in same.values())
    assert Image.open(tmp_path / "out" / "mmvp_patterns.png").size[0] > 300
    r = run_cli("eval.mmvp", "--data", str(bench), "--model", f"mcl={merged}", "--compare", "mcl", "base",
                "--out", str(tmp_path / "o2"))
    assert r.returncode == 2 and r.stderr.strip() == \
        "python -m eval.mmvp: error: --compare: unknown model 'base' (models: mcl)"
    # bad input: one line each, naming the file or model
    (bench / "MLLM_VLM Images" / "Spatial" / "20.jpg").unlink()
    r = run_cli("eval.mmvp", "--data", str(bench), "--model", str(merged), "--out", str(tmp_path / "o2"))
    assert r.returncode == 2 and "Spatial/20.jpg: missing image" in r.stderr
    shutil.rmtree(bench / "MLLM_VLM Images" / "Spatial")
    r = run_cli("eval.mmvp", "--data", str(bench), "--model", str(merged), "--out", str(tmp_path / "o2"))
    assert r.returncode == 2 and "Spatial: missing image folder for type 'Spatial'" in r.stderr
    (bench / "Questions.csv").write_text("Question ID,Type,Statement\n1,Spatial\n2,Spatial,one circle\n")
    r = run_cli("eval.mmvp", "--data", str(bench), "--model", str(merged), "--out", str(tmp_path / "o2"))
    assert r.returncode == 2 and "Questions.csv:2: expected 3 columns" in r.stderr
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    good = write_benchmark(tmp_path / "bench2", tiny_spec, pairs=1, seed=1)
    r = run_cli("eval.mmvp", "--data", str(good), "--model", str(tmp_path / "junk.pt"), "--out", str(tmp_path / "o2"))
    assert r.returncode == 2 and "junk.pt" in r.stderr and "does not load" in r.stderr
    assert not (tmp_path / "o2").exists()


def test_probes_beat_chance_on_an_attribute_the_model_learned(tmp_path, tiny_shards, tiny_spec):
    from eval.encoders import load_encoder
    from eval.probes import probe
    from shards.generate import generate
    stage = tmp_path / "stage1"
    r = run_cli("pipeline.train", f"data={tiny_shards}", f"out={stage}", "steps=40", "batch_size=32", "warmup=2",
                "lr=1e-3", "workers=1", "threads=2")
    assert r.returncode == 0, r.stderr[-3000:]
    held_out = tmp_path / "held_out"
    generate(held_out, tiny_spec, 400, 200, seed=123, progress=False)
    torch.manual_seed(5)
    untrained, *_ = models.create("mcl-tiny-vit")
    models.save_model(untrained, "mcl-tiny-vit", models.model_config("mcl-tiny-vit"), tmp_path / "untrained")
    res = probe([load_encoder(f"trained={stage / 'model'}"), load_encoder(f"untrained={tmp_path / 'untrained'}")],
                str(held_out))
    bg = res["trained"]["background"]
    assert bg["chance"] == 25.0 and bg["zero_shot"] > 60 and bg["linear"] > 90
    assert res["untrained"]["background"]["zero_shot"] < bg["zero_shot"]
    assert set(res["trained"]) == {"background", "shape", "count", "position"}


def test_a_training_checkpoint_is_a_model_too(tmp_path, two_stages):
    from eval.encoders import load_encoder
    model, *_ = models.create("", pretrained=str(two_stages[0]))
    torch.save({"step": 3, "name": "mcl-tiny-vit", "state_dict": model.state_dict(), "optimizer": {}},
               tmp_path / "step_00000003.pt")
    enc = load_encoder(f"ckpt={tmp_path / 'step_00000003.pt'}")
    pil = Image.new("RGB", (40, 40), "blue")
    with torch.no_grad():
        want = F.normalize(model.encode_image(enc.preprocess(pil)[None]), dim=-1)
    torch.testing.assert_close(enc.images([pil]), want)
    assert enc.name == "ckpt"


def test_one_loader_takes_every_spec_and_names_the_ones_that_do_not_load(tmp_path, two_stages):
    from common.cli import UsageError
    from pipeline.merged_model import MergedCLIP
    folder = str(two_stages[0])
    ref, _, pre, tok = models.create("", pretrained=folder)
    torch.save({"step": 1, "name": "mcl-tiny-vit", "state_dict": ref.state_dict()}, tmp_path / "step_00000001.pt")
    weights = str(two_stages[0] / models.WEIGHTS_NAME)
    x, pil = torch.randn(2, 3, 32, 32), Image.new("RGB", (40, 30), "green")
    with torch.no_grad():
        want = ref.encode_image(x)
    for spec, pretrained in ((folder, None), (str(tmp_path / "step_00000001.pt"), None),
                             (f"mcl-tiny-vit:{weights}", None), ("mcl-tiny-vit", weights)):
        loaded = models.load(spec, pretrained)
        assert not loaded.model.training, spec
        with torch.no_grad():
            torch.testing.assert_close(loaded.model.encode_image(x), want)
        assert torch.equal(loaded.preprocess(pil), pre(pil)), spec
        assert torch.equal(loaded.tokenizer(["two red circles"]), tok(["two red circles"])), spec
    path = merge(two_stages, tmp_path / "merged.pt")
    m = models.load(path)
    assert isinstance(m.model, MergedCLIP) and m.model.names == ["stage1", "stage2"]
    torch.testing.assert_close(m.model.encode_image(x), load_merged(path).encode_image(x))
    assert m.preprocess is m.model.preprocess and m.tokenizer is m.model.tokenizer
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    torch.save({"something": 1}, tmp_path / "other.pt")
    for spec, message in (("no-such-arch:openai", "'no-such-arch:openai': not a merged .pt file"),
                          (str(tmp_path / "junk.pt"), "junk.pt' does not load: "),
                          (str(tmp_path / "other.pt"), "other.pt: neither a merged MCL model nor a training")):
        with pytest.raises(UsageError, match=message) as err:
            models.load(spec)
        assert "\n" not in str(err.value)


def _wds_set(folder):
    """(PIL images, labels or captions) of a CLIP_benchmark webdataset set, in file order."""
    import io
    import tarfile
    images, targets = [], []
    for shard in sorted((folder / "test").glob("*.tar"), key=lambda p: int(p.stem)):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                data = tar.extractfile(m).read()
                if m.name.endswith(".png"):
                    images.append(Image.open(io.BytesIO(data)).convert("RGB"))
                elif m.name.endswith(".cls"):
                    targets.append(int(data))
                elif m.name.endswith(".txt"):
                    targets.append(data.decode())
    return images, targets


def test_clip_benchmark_job_matches_a_direct_computation_and_rejects_bad_input(tmp_path, two_stages, tiny_spec,
                                                                             monkeypatch):
    """eval.zeroshot on the world's CLIP_benchmark sets (written by shards.zeroshot_writer with
    CLIP_benchmark's own writer): top-1 and retrieval recall@1 equal a direct computation for a
    stage model; the same images as an image folder give the same top-1; the merged model runs;
    bad input gets one line and exit 2."""
    from eval.encoders import load_encoder
    from shards.generate import generate
    from shards.zeroshot_writer import write_sets
    generate(tmp_path / "held_out", tiny_spec, 120, 120, seed=11, progress=False)
    sets = write_sets(str(tmp_path / "held_out"), tmp_path / "sets")
    assert set(sets) == {"background", "shape", "count", "position", "captions"}
    merged = merge(two_stages, tmp_path / "merged.pt")

    # the same shape images as an image folder (class folders in class order) with the same names and templates
    images, labels = _wds_set(sets["shape"])
    folder = tmp_path / "shape_folder"
    for i, (img, label) in enumerate(zip(images, labels)):
        (folder / "test" / f"c{label}").mkdir(parents=True, exist_ok=True)
        img.save(folder / "test" / f"c{label}" / f"{i:04d}.png")
    for name in ("classnames.txt", "zeroshot_classification_templates.txt"):
        shutil.copy(sets["shape"] / name, folder / name)

    r = run_cli("eval.zeroshot", "--dataset", f"wds/shape={sets['shape']}", "--dataset", f"folder/shape={folder}",
                "--dataset", f"wds/captions={sets['captions']}", "--model", f"s1={two_stages[0]}",
                "--model", f"mcl={merged}", "--out", str(tmp_path / "out"), "--batch-size", "32",
                env={"CUDA_VISIBLE_DEVICES": ""})  # fp32 on the CPU, as the direct computation below
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "zeroshot_summary.json").read_text())
    assert list(summary) == ["s1", "mcl"] and list(summary["mcl"]) == ["wds/shape", "folder/shape", "wds/captions"]
    assert (tmp_path / "out" / "zeroshot.png").stat().st_size > 1000
    assert "wds/shape (acc1)" in r.stdout
    # each item's outcome of the main metric: their mean is the metric, their interval eval.stats'
    from clip_benchmark.metrics import zeroshot_retrieval
    from eval import outcomes as O
    from eval import stats as S
    from eval.zeroshot import dataloader, main_metric, parse_dataset_arg
    items = O.read(tmp_path / "out" / "zeroshot_samples.csv", "dataset")
    for name in ("s1", "mcl"):
        for d, record in summary[name].items():
            assert np.mean(items[name][d]) == pytest.approx(main_metric(record)[1], abs=1e-6), (name, d)
            assert record["interval"] == S.interval([items[name][d]]), (name, d)
    # the retrieval metrics kept per caption are CLIP_benchmark's own
    enc = load_encoder(f"s1={two_stages[0]}")
    _, loader = dataloader(parse_dataset_arg(f"wds/captions={sets['captions']}"), enc.preprocess, 32, 0, False)
    theirs = zeroshot_retrieval.evaluate(enc.model, loader, enc.tokenizer, device="cpu", amp=False,
                                         recall_k_list=[1, 5, 10])
    assert {k: round(v, 6) for k, v in theirs.items()} == \
        {k: v for k, v in summary["s1"]["wds/captions"].items() if "recall@" in k}

    # the two models share each set's pass (one preprocessing); each gets its own numbers
    assert "wds/shape: one pass for s1, mcl" in r.stderr
    from eval import zeroshot as Z
    built = []
    real = Z.dataloader

    def counted(bench, *args):
        built.append(bench.name)
        return real(bench, *args)
    monkeypatch.setattr(Z, "dataloader", counted)
    encs = [load_encoder(f"s1={two_stages[0]}"), load_encoder(f"mcl={merged}")]
    shared = Z.evaluate([Z.parse_dataset_arg(f"wds/shape={sets['shape']}")], encs, batch_size=32)
    assert built == ["wds/shape"]
    for n in ("s1", "mcl"):  # the record without its outcomes (written to the CSV) and their interval
        assert {k: v for k, v in shared[n]["wds/shape"].items() if k != "outcomes"} == \
            {k: v for k, v in summary[n]["wds/shape"].items() if k != "interval"}
        assert np.mean(shared[n]["wds/shape"]["outcomes"]) == pytest.approx(summary[n]["wds/shape"]["acc1"], abs=1e-6)
    classes = (sets["shape"] / "classnames.txt").read_text().split("\n")[:-1]
    templates = (sets["shape"] / "zeroshot_classification_templates.txt").read_text().split("\n")[:-1]
    cap_images, captions = _wds_set(sets["captions"])
    for name, spec in (("s1", two_stages[0]), ("mcl", merged)):
        enc = load_encoder(f"{name}={spec}")
        text = torch.stack([F.normalize(enc.texts([t.format(c=c) for t in templates]).mean(0), dim=0)
                            for c in classes])
        top1 = float(((enc.images(images) @ text.T).argmax(1) == torch.tensor(labels)).float().mean())
        assert summary[name]["wds/shape"]["acc1"] == pytest.approx(top1, abs=1e-6), name
        assert summary[name]["folder/shape"]["acc1"] == pytest.approx(top1, abs=1e-6), name
        scores = enc.texts(captions) @ enc.images(cap_images).T
        recall1 = float((scores.argmax(1) == torch.arange(len(captions))).float().mean())
        assert summary[name]["wds/captions"]["image_retrieval_recall@1"] == pytest.approx(recall1, abs=1e-6), name
    mcl = summary["mcl"]["wds/captions"]
    assert 0 <= mcl["image_retrieval_recall@1"] <= mcl["image_retrieval_recall@5"] <= mcl["image_retrieval_recall@10"]
    assert summary["s1"]["wds/shape"] != summary["mcl"]["wds/shape"] or \
        summary["s1"]["wds/captions"] != summary["mcl"]["wds/captions"]

    bad = [("--dataset", "nosuchset=/tmp", "--model", str(two_stages[0])),
           ("--dataset", f"wds/shape={tmp_path / 'nowhere'}", "--model", str(two_stages[0])),
           ("--dataset", f"wds/shape={sets['shape']}", "--model", str(tmp_path / "junk.pt"))]
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    wants = ["Unsupported dataset: nosuchset", "nowhere/test/nshards.txt: missing", "does not load"]
    for args, want in zip(bad, wants):
        r = run_cli("eval.zeroshot", *args, "--out", str(tmp_path / "o2"))
        assert r.returncode == 2 and want in r.stderr.strip().splitlines()[-1], (want, r.stderr[-2000:])
    assert not (tmp_path / "o2").exists()


@pytest.mark.timeout(120)
def test_a_pass_shared_by_several_consumers_reaches_each_whole_and_fails_cleanly():
    """fan_out: every consumer sees every item in order from one iteration; one that stops early
    or closes its view does not block the others; a consumer that fails stops the pass, and its
    error (or the pass's own) is raised, with no hang."""
    from eval.fanout import fan_out

    class Items:
        def __init__(self, n=50, fail_at=None):
            self.n, self.fail_at, self.passes, self.read = n, fail_at, 0, 0

        def __iter__(self):
            self.passes += 1
            for i in range(self.n):
                if i == self.fail_at:
                    raise OSError("shard 3 is gone")
                self.read += 1
                yield i

    def closes(view):
        view.close()
        return "closed"
    items = Items()
    got = fan_out(items, [list, sum, lambda view: next(iter(view)), closes])
    assert got == [list(range(50)), sum(range(50)), 0, "closed"] and items.passes == 1 and items.read == 50

    def broken(view):
        for i in view:
            if i == 5:
                raise ValueError("consumer failed at 5")
    items = Items(n=1000)
    with pytest.raises(ValueError, match="consumer failed at 5"):
        fan_out(items, [list, broken, sum], depth=1)
    assert items.read < 20  # the pass stopped soon after the failure
    with pytest.raises(OSError, match="shard 3 is gone"):
        fan_out(Items(fail_at=20), [list, sum], depth=1)
    with pytest.raises(ValueError, match="depth"):
        fan_out(Items(), [list, sum], depth=0)

def test_a_run_s_zero_shot_results_count_as_done_only_for_the_same_models_sets_and_roots():
    from eval.zeroshot import covers, duplicate_names
    summary = {"mcl": {"wds/a": {"task": "zeroshot_classification", "root": "/r1", "acc1": 0.5}},
               "stage1": {"wds/a": {"task": "zeroshot_classification", "root": "/r1", "acc1": 0.4}}}
    assert covers(summary, ["mcl", "stage1"], ["wds/a=/r1"])
    assert not covers(summary, ["mcl", "stage1"], ["wds/a=/r2"])  # the set moved: evaluate again
    assert not covers(summary, ["mcl", "stage1", "stage2"], ["wds/a=/r1"])  # a model more
    assert not covers(summary, ["mcl"], ["wds/a=/r1", "wds/b=/r1"])  # a set more
    assert duplicate_names(["wds/a=/r1", "wds/a=/r2", "wds/b"]) == ["wds/a"]


def test_sugarcrepe_job_matches_a_direct_computation_and_rejects_bad_input(tmp_path, two_stages, tiny_spec):
    """eval.sugarcrepe on the world's SugarCrepe-format set (shards.sugarcrepe_writer): each
    category's accuracy equals one computed here from the models' features, the intervals and
    tests are eval.stats' on the per-sample outcomes, an unreadable image is skipped for every
    model, and bad input gets one line and exit 2."""
    from eval import outcomes as O
    from eval import stats as S
    from eval.encoders import load_encoder
    from shards.sugarcrepe_writer import write_sets
    data = write_sets(tmp_path / "sc", tiny_spec, per_attribute=8, seed=2)
    kinds = sorted(a.kind for a in tiny_spec.attributes)
    assert sorted(p.name for p in data.glob("*.json")) == [f"replace_{k}.json" for k in kinds]
    first = json.loads((data / "replace_shape.json").read_text())["0"]
    scene = json.loads((data / "world" / "attributes.json").read_text())[first["filename"]]
    assert first["caption"].startswith("a photo of ") and scene["shape"] in first["caption"]
    changed = [(w1, w2) for w1, w2 in zip(first["caption"].split(), first["negative_caption"].split()) if w1 != w2]
    assert len(changed) == 1 and scene["shape"] in changed[0][0]  # only the shape word is replaced

    merged = merge(two_stages, tmp_path / "merged.pt")
    (data / "val2017" / "000003.jpg").write_bytes(b"not a jpeg")  # a sample of replace_background
    out = tmp_path / "out"
    r = run_cli("eval.sugarcrepe", "--data", str(data), "--model", f"mcl={merged}", "--model", f"s1={two_stages[0]}",
                "--compare", "mcl", "s1", "--out", str(out), env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "sugarcrepe_summary.json").read_text())
    assert summary["skipped"] == [str(data / "val2017" / "000003.jpg")] and "cannot read image" in r.stderr
    assert summary["samples"] == {f"replace_{k}": 8 - (k == "background") for k in kinds}
    for name, spec in (("mcl", merged), ("s1", two_stages[0])):
        enc = load_encoder(f"{name}={spec}")
        for k in kinds:
            records = [rec for rec in json.loads((data / f"replace_{k}.json").read_text()).values()
                       if rec["filename"] != "000003.jpg"]
            images = enc.images([Image.open(data / "val2017" / rec["filename"]).convert("RGB") for rec in records])
            pos = (images * enc.texts([rec["caption"] for rec in records])).sum(-1)
            neg = (images * enc.texts([rec["negative_caption"] for rec in records])).sum(-1)
            want = 100 * float((pos > neg).float().mean())
            assert summary["models"][name][f"replace_{k}"]["score"] == pytest.approx(want, abs=1e-3), (name, k)
    samples = O.read(out / "sugarcrepe_samples.csv", "category")
    assert summary["models"]["s1"] == S.intervals(samples["s1"])
    assert summary["comparisons"]["mcl - s1"] == S.paired(samples["mcl"], samples["s1"])
    assert "mcl - s1: " in r.stdout and (out / "sugarcrepe.png").read_bytes()[:4] == b"\x89PNG"

    (tmp_path / "junk.pt").write_bytes(b"not a model")
    bad_json = tmp_path / "bad"
    shutil.copytree(data, bad_json)
    (bad_json / "replace_count.json").write_text('{"0": {"filename": "000001.jpg", "caption": "two"}}')
    missing = tmp_path / "missing"
    shutil.copytree(data, missing)
    (missing / "val2017" / "000001.jpg").unlink()
    from common.cli import UsageError
    from eval.sugarcrepe import read_sets
    for folder, want in ((tmp_path / "nowhere", "nowhere: not a folder"),
                         (bad_json, "replace_count.json: entry '0' needs the string fields"),
                         (missing, "000001.jpg: missing image (entry '1' of replace_background.json)"),
                         (data / "val2017", "no <category>.json")):
        with pytest.raises(UsageError, match=re.escape(want)):
            read_sets(folder)
    for (folder, model), want in (((bad_json, f"s1={two_stages[0]}"), "needs the string fields"),
                                  ((data, tmp_path / "junk.pt"), "does not load")):
        r = run_cli("eval.sugarcrepe", "--data", str(folder), "--model", str(model), "--out", str(tmp_path / "o2"))
        assert r.returncode == 2 and want in r.stderr and len(r.stderr.strip().splitlines()) == 1, (want, r.stderr)
    r = run_cli("eval.sugarcrepe", "--data", str(data), "--model", f"s1={two_stages[0]}", "--compare", "s1", "mcl",
                "--out", str(tmp_path / "o2"))
    assert r.returncode == 2 and "--compare: unknown model 'mcl' (models: s1)" in r.stderr
    assert not (tmp_path / "o2").exists()
