"""Zero-shot classification and retrieval on the CLIP_benchmark suite, several models side by side.

    python -m eval.zeroshot --dataset wds/cars=/data/wds_cars --dataset imagenet1k=/data/imagenet \\
        --model mcl=runs/r/merged.pt --model base=runs/b/stage1/model --model openai=ViT-B-32:openai --out results/

A dataset is NAME[=ROOT]:
- any name CLIP_benchmark's `build_dataset` knows, ROOT its `--dataset_root` (imagenet1k,
  cifar10, vtab/..., mscoco_captions, ...; nothing is downloaded unless --download);
- `wds/<name>`: CLIP_benchmark's webdataset format, ROOT holding test/{0..N-1}.tar,
  test/nshards.txt, classnames.txt and zeroshot_classification_templates.txt (classification)
  or dataset_type.txt saying `retrieval` (its images' .txt captions);
- `folder/<name>`: an image folder, ROOT/test/<class folder>/<images>, with ROOT/classnames.txt
  (one name per class folder, in sorted folder order; default: the folder names) and
  ROOT/zeroshot_classification_templates.txt (default: "a photo of a {c}.").
The task follows the dataset: retrieval for CLIP_benchmark's caption sets and for wds sets of
type retrieval, classification otherwise. The metrics are CLIP_benchmark's own functions
(acc1, acc5, mean_per_class_recall; image and text retrieval recall@1/5/10).

A model is NAME=SPEC (or SPEC; see eval.encoders): a merged MCL artifact, a stage folder, a
training checkpoint, or an open_clip ARCH:TAG. Writes OUT/zeroshot.csv (model, dataset, task,
metric, value), OUT/zeroshot_samples.csv (model, dataset, item, correct: the main metric's outcome
per image, or per caption for retrieval), OUT/zeroshot_summary.json ({model: {dataset: {"task",
"root", metric: value, "interval": the main metric's bootstrap 95% interval over those outcomes}}})
and OUT/zeroshot.png (each dataset's main metric per model, with its interval), each atomically.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from common.cli import ArgumentParser, UsageError, run_main, setup_logging
from common.io import write_csv, write_json
from eval.encoders import Encoder, load_encoder
from eval.fanout import fan_out

log = logging.getLogger("eval.zeroshot")
SUMMARY_NAME = "zeroshot_summary.json"  # what launch checks to call the evaluation done
SAMPLES_NAME = "zeroshot_samples.csv"
SPLIT = "test"
RECALL_K = (1, 5, 10)
MAIN_METRIC = {"zeroshot_classification": "acc1", "zeroshot_retrieval": "image_retrieval_recall@5"}


@dataclass(frozen=True)
class Benchmark:
    name: str
    root: str

    @property
    def task(self) -> str:
        if self.name.startswith("wds/"):
            kind = Path(self.root, "dataset_type.txt")
            return "zeroshot_retrieval" if kind.is_file() and kind.read_text().strip() == "retrieval" \
                else "zeroshot_classification"
        if self.name.startswith("folder/"):
            return "zeroshot_classification"
        from clip_benchmark.datasets.builder import get_dataset_default_task

        return get_dataset_default_task(self.name)


def parse_dataset_arg(arg: str) -> Benchmark:
    """NAME[=ROOT] -> Benchmark (ROOT default "root", as CLIP_benchmark's)."""
    name, _, root = arg.partition("=")
    if not name:
        raise UsageError(f"--dataset {arg!r}: expected NAME[=ROOT]")
    return Benchmark(name, root or "root")


def check(bench: Benchmark, download: bool = False) -> None:
    """The data set is one CLIP_benchmark (or the folder reader) knows and reads (UsageError naming it)."""
    if bench.name.startswith("wds/"):
        count = Path(bench.root, SPLIT, "nshards.txt")
        if not count.is_file():
            raise UsageError(f"{count}: missing (not a CLIP_benchmark webdataset folder for {bench.name})")
        if bench.task == "zeroshot_classification":
            for name in ("classnames.txt", "zeroshot_classification_templates.txt"):
                if not Path(bench.root, name).is_file():
                    raise UsageError(f"{Path(bench.root, name)}: missing (needed for zero-shot classification)")
    elif bench.name.startswith("folder/"):
        if not Path(bench.root, SPLIT).is_dir():
            raise UsageError(f"{Path(bench.root, SPLIT)}: missing (an image folder needs ROOT/{SPLIT}/<class>/)")
    elif bench.task not in MAIN_METRIC:
        raise UsageError(f"--dataset {bench.name}: task {bench.task} is not run here "
                         "(zero-shot classification and retrieval are)")
    else:
        build(bench, None, download)  # an unknown name or missing files fail here, before any model loads


def build(bench: Benchmark, transform, download: bool):
    """The data set (with .classes and .templates for classification), as CLIP_benchmark builds it."""
    from clip_benchmark.datasets.builder import build_dataset

    try:
        if bench.name.startswith("folder/"):
            return _folder_dataset(bench, transform)
        return build_dataset(bench.name, root=bench.root, transform=transform, split=SPLIT, download=download,
                             task=bench.task)
    except ImportError as exc:  # e.g. vtab/ needs task_adaptation, tfds/ tensorflow_datasets
        raise UsageError(f"--dataset {bench.name}: needs the package {exc.name or exc} (pip install it)") from exc
    except (OSError, ValueError, RuntimeError, AssertionError, KeyError) as exc:
        raise UsageError(f"--dataset {bench.name}={bench.root}: {str(exc).strip() or type(exc).__name__}") from exc


def _folder_dataset(bench: Benchmark, transform):
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(os.path.join(bench.root, SPLIT), transform=transform)
    names_file = Path(bench.root, "classnames.txt")
    names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()] \
        if names_file.is_file() else [c.replace("_", " ") for c in ds.classes]
    if len(names) != len(ds.classes):
        raise UsageError(f"{names_file}: {len(names)} names for {len(ds.classes)} class folders")
    templates_file = Path(bench.root, "zeroshot_classification_templates.txt")
    ds.templates = [line.strip() for line in templates_file.read_text().splitlines() if line.strip()] \
        if templates_file.is_file() else ["a photo of a {c}."]
    ds.classes = names
    return ds


def dataloader(bench: Benchmark, transform, batch_size: int, workers: int, download: bool):
    """(the data set, a DataLoader over it) as CLIP_benchmark's own CLI builds them."""
    from clip_benchmark.datasets.builder import get_dataset_collate_fn

    ds = build(bench, transform, download)
    if bench.name.startswith("wds/"):  # a worker without a shard would fail webdataset's empty check
        shards = int(Path(bench.root, SPLIT, "nshards.txt").read_text().split()[0])
        return ds, torch.utils.data.DataLoader(ds.batched(batch_size), batch_size=None,
                                               num_workers=min(workers, shards))
    return ds, torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers,
                                           collate_fn=get_dataset_collate_fn(bench.name))


def evaluate(benchmarks: list[Benchmark], encoders: list[Encoder], batch_size: int = 64, workers: int = 0,
             download: bool = False) -> dict:
    """{model: {dataset: {"task": ..., metric: value, ..., "outcomes": [0/1 per item]}}} with
    CLIP_benchmark's metrics; "outcomes" are the main metric's (eval.zeroshot.MAIN_METRIC). The
    benchmarks are checked with `check` first, before the models load (main and launch's eval step do).
    Models with the same preprocessing share one pass over each data set (eval.fanout)."""
    from tqdm import tqdm

    tqdm.get_lock()  # made before the consumers' threads start their progress bars
    results: dict = {enc.name: {} for enc in encoders}
    groups: dict[tuple, list[Encoder]] = {}
    for enc in encoders:
        groups.setdefault((preprocess_signature(enc.preprocess), str(enc.device)), []).append(enc)
    for bench in benchmarks:
        for group in groups.values():
            ds, loader = dataloader(bench, group[0].preprocess, batch_size, workers, download)
            if len(group) > 1:
                log.info("%s: one pass for %s", bench.name, ", ".join(enc.name for enc in group))
            scores = fan_out(loader, [functools.partial(_metrics, bench, ds, enc) for enc in group])
            for enc, (metrics, outcomes) in zip(group, scores):
                metrics = {k: round(float(v), 6) for k, v in metrics.items()}
                results[enc.name][bench.name] = {"task": bench.task, "root": bench.root, **metrics,
                                                 "outcomes": outcomes}
                log.info("%s on %s: %s", enc.name, bench.name,
                         ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return results


def preprocess_signature(preprocess) -> str:
    """What `preprocess` makes of fixed random probe images (RGB, grayscale and RGBA, small and
    large), hashed: equal for transforms that do the same, though their reprs may differ (a crop
    size as a list or a tuple). A transform that is random (two calls differ) or fails on a
    probe gets a signature of its own: its model makes its own pass."""
    import hashlib

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    probes = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
              for (h, w), mode in (((61, 97), "RGB"), ((61, 97), "L"), ((61, 97), "RGBA"), ((389, 517), "RGB"))]
    digest = hashlib.sha256()
    try:
        for probe in probes:
            first, again = preprocess(probe), preprocess(probe)
            if not torch.equal(first, again):
                return f"random:{id(preprocess)}"
            digest.update(f"{tuple(first.shape)} {first.dtype}".encode())
            digest.update(first.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    except Exception:  # noqa: BLE001 - e.g. a crop larger than a probe: not shared, evaluated alone
        return f"unprobed:{id(preprocess)}"
    return digest.hexdigest()


def _metrics(bench: Benchmark, ds, enc: Encoder, batches) -> tuple[dict, list[int]]:
    """CLIP_benchmark's metrics of `enc` on the data set `ds`, whose batches `batches` yields, and
    the main metric's outcome per item."""
    from clip_benchmark.metrics import zeroshot_classification

    device = enc.device if isinstance(enc.device, str) else enc.device.type
    amp = device == "cuda"
    enc.model.eval()
    with torch.no_grad():
        if bench.task == "zeroshot_retrieval":
            return retrieval_metrics(enc.model, batches, enc.tokenizer, device, amp)
        classifier = zeroshot_classification.zero_shot_classifier(enc.model, enc.tokenizer, ds.classes,
                                                                  ds.templates, device, amp=amp)
        logits, target = zeroshot_classification.run_classification(enc.model, classifier, batches, device, amp=amp)
        metrics = classification_metrics(logits, target, len(ds.classes))
        return metrics, top1_outcomes(logits, target, len(ds.classes))


def retrieval_metrics(model, batches, tokenizer, device: str, amp: bool) -> tuple[dict, list[int]]:
    """CLIP_benchmark's zero-shot retrieval (`zeroshot_retrieval.evaluate`: its embedding pass
    and its `recall_at_k`), keeping each caption's image recall@5 outcome (1 when its image is
    among the 5 best): the metrics are the means of such per-query outcomes."""
    import torch.nn.functional as F
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

    images, texts, text_image, start = [], [], [], 0
    for batch_images, batch_texts in batches:
        tokens = tokenizer([t for captions in batch_texts for t in captions]).to(device)
        with torch.autocast(device, enabled=amp):
            images.append(F.normalize(model.encode_image(batch_images.to(device)), dim=-1).float().cpu())
            texts.append(F.normalize(model.encode_text(tokens), dim=-1).float().cpu())
        text_image += [start + i for i, captions in enumerate(batch_texts) for _ in captions]
        start += len(batch_images)
    scores = torch.cat(texts) @ torch.cat(images).t()
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), text_image] = True
    size = len(images[0])
    metrics, outcomes = {}, []
    for k in RECALL_K:
        per_text = (batchify(recall_at_k, scores, positive, size, device, k=k) > 0).int()
        per_image = batchify(recall_at_k, scores.T, positive.T, size, device, k=k) > 0
        metrics[f"image_retrieval_recall@{k}"] = per_text.float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = per_image.float().mean().item()
        if f"image_retrieval_recall@{k}" == MAIN_METRIC["zeroshot_retrieval"]:
            outcomes = per_text.tolist()
    return metrics, outcomes


def classification_metrics(logits: torch.Tensor, target: torch.Tensor, classes: int) -> dict:
    """CLIP_benchmark's classification metrics (acc1; acc5 from 5 classes on; mean per-class
    recall; mean average precision for multi-label sets) on its logits. Computed here because
    its own `accuracy` (clip_benchmark 1.6.2) fails with numpy >= 2.4 (float() of a 1-element array)."""
    from clip_benchmark.metrics.zeroshot_classification import average_precision_per_class
    from sklearn.metrics import balanced_accuracy_score

    if target.ndim == 2:
        return {"mean_average_precision": average_precision_per_class(logits, target).mean().item()}
    hits = _hits(logits, target, classes)
    metrics = {"acc1": hits[:, 0].float().mean().item()}
    if classes >= 5:
        metrics["acc5"] = hits.any(dim=1).float().mean().item()
    metrics["mean_per_class_recall"] = float(balanced_accuracy_score(target.numpy(), logits.argmax(1).numpy()))
    return metrics


def _hits(logits: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    return logits.topk(min(5, classes), dim=1).indices == target[:, None]


def top1_outcomes(logits: torch.Tensor, target: torch.Tensor, classes: int) -> list[int]:
    """Each image's top-1 outcome, as acc1 counts it (ties broken alike); none for multi-label sets."""
    return _hits(logits, target, classes)[:, 0].int().tolist() if target.ndim == 1 else []


NOT_METRICS = ("task", "root", "interval")


def main_metric(record: dict) -> tuple[str, float]:
    key = MAIN_METRIC.get(record["task"], next(k for k in record if k not in NOT_METRICS))
    return key, record[key]


def covers(summary: dict, models: list[str], benchmarks: list[str]) -> bool:
    """A summary holds every one of `models` (names) on every one of `benchmarks` (NAME=ROOT,
    the same roots): nothing of it is to be redone."""
    wanted = {(b.name, b.root) for b in map(parse_dataset_arg, benchmarks)}
    return all(name in summary and wanted <= {(d, r.get("root")) for d, r in summary[name].items()}
               for name in models)


def duplicate_names(benchmarks: list[str]) -> list[str]:
    names = [parse_dataset_arg(b).name for b in benchmarks]
    return sorted({n for n in names if names.count(n) > 1})


def write_outputs(results: dict, out: str | Path) -> dict:
    """The CSV files and the chart, then the summary: `results` less each record's "outcomes",
    plus its "interval" (eval.stats, %) when it has outcomes."""
    from eval.stats import interval

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics, items = [], []
    summary: dict = {}
    for model, per in results.items():
        for dataset, record in per.items():
            outcomes = record.get("outcomes") or []
            record = {k: v for k, v in record.items() if k != "outcomes"}
            if outcomes:
                record["interval"] = interval([outcomes])
            summary.setdefault(model, {})[dataset] = record
            for metric, value in record.items():
                if metric not in NOT_METRICS:
                    metrics.append([model, dataset, record["task"], metric, value])
            items += ([model, dataset, i, v] for i, v in enumerate(outcomes))
    write_csv(out / "zeroshot.csv", ["model", "dataset", "task", "metric", "value"], metrics)
    write_csv(out / SAMPLES_NAME, ["model", "dataset", "item", "correct"], items)
    results = summary
    plot(results, out / "zeroshot.png")
    write_json(out / SUMMARY_NAME, results, sort_keys=False)  # last: it marks the evaluation done
    return results


def plot(results: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt
    import numpy as np

    from eval.plots import save_png

    datasets = list(next(iter(results.values())))
    labels = [f"{d}\n{main_metric(next(iter(results.values()))[d])[0]}" for d in datasets]
    x, width = np.arange(len(datasets)), 0.8 / max(1, len(results))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(datasets) + 2), 4))
    for i, (name, per) in enumerate(results.items()):
        scores = [100 * main_metric(per[d])[1] for d in datasets]
        lows = [per[d].get("interval", {}).get("low", s) for d, s in zip(datasets, scores)]
        highs = [per[d].get("interval", {}).get("high", s) for d, s in zip(datasets, scores)]
        errors = np.clip([np.subtract(scores, lows), np.subtract(highs, scores)], 0, None)
        ax.bar(x + i * width - 0.4 + width / 2, scores, width, yerr=errors, capsize=2, label=name)
    ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("%  (bars: bootstrap 95% intervals)")
    ax.set_ylim(0, 100)
    ax.set_title("zero-shot (CLIP_benchmark)")
    ax.legend(fontsize=8)
    return save_png(fig, path)


def table(results: dict) -> str:
    datasets = list(next(iter(results.values())))
    width = max(len(n) for n in results) + 2
    lines = [f"{'dataset (metric %)':<40}" + "".join(f"{n:>{width}}" for n in results)]
    for d in datasets:
        metric = main_metric(next(iter(results.values()))[d])[0]
        lines.append(f"{d + ' (' + metric + ')':<40}"
                     + "".join(f"{100 * results[n][d][metric]:>{width}.1f}" for n in results))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m eval.zeroshot", description=__doc__)
    p.add_argument("--dataset", action="append", required=True, metavar="NAME[=ROOT]", help="a data set; repeat")
    p.add_argument("--model", action="append", required=True, metavar="[NAME=]SPEC", help="a model; repeat")
    p.add_argument("--out", required=True, help="folder for the CSV, JSON and PNG")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--download", action="store_true", help="let CLIP_benchmark download a missing data set")
    args = p.parse_args(argv)
    setup_logging()
    if duplicate_names(args.dataset):
        raise UsageError(f"--dataset: {', '.join(duplicate_names(args.dataset))} given twice")
    benchmarks = [parse_dataset_arg(d) for d in args.dataset]
    for bench in benchmarks:
        check(bench, args.download)  # bad data fails before models load
    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoders = [load_encoder(m, device) for m in args.model]
    results = write_outputs(evaluate(benchmarks, encoders, args.batch_size, args.workers, args.download), args.out)
    print(table(results))
    return 0


if __name__ == "__main__":
    run_main(main, "python -m eval.zeroshot")
