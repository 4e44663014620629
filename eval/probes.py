"""Attribute probes on the synthetic world: which attribute each model has learned.

    python -m eval.probes --data HELD_OUT_SHARDS --model mcl=runs/r/merged.pt --model stage1=runs/r/stage1/model \\
        --out results/

For every model and every attribute of the world (read from the shards' world.json):
- linear probe: logistic regression on the model's normalised image features, trained on
  a random 70% of the samples and scored on the other 30%;
- kNN: the majority value among the K nearest (cosine) of those training samples
  (K = 20, the usual self-supervised kNN monitor's rule without its weighting);
- zero-shot (models with a text tower): each image classified among the prompts
  "a photo of " + the phrase of each value of that attribute alone (e.g. "some triangles").
This is the paper's unimodal table in our world; image-only models (pipeline.image_model)
get the linear and kNN probes. Every model is scored on the same test
samples, so models compare pair by pair. Writes OUT/probes_samples.csv (each test sample's
outcome per model, attribute and probe), OUT/probes.json (accuracies, chance and each
accuracy's bootstrap 95% interval over the test samples, eval.stats) and OUT/probes.png
(accuracy per attribute and model, with chance marked) and prints the table.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from eval.encoders import Encoder, load_encoder
from shards import world as W
from common.cli import ArgumentParser, UsageError, run_main, setup_logging
from common.io import write_json
from shards.world_samples import labelled_samples, read_world

log = logging.getLogger("eval.probes")
RECORD_NAME = "probes.json"  # what launch checks to call the evaluation done
SAMPLES_NAME = "probes_samples.csv"
KNN_K = 20
PROBE_TITLES = {"linear": "linear probe", "knn": f"kNN (k={KNN_K})", "zero_shot": "zero-shot"}


def probe(encoders: list[Encoder], data: str, max_samples: int = 2000, seed: int = 0) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    spec = read_world(data, "probes")
    samples = labelled_samples(data, max_samples, captions=False)  # attributes and images, no caption needed
    if len(samples) < 20:
        raise UsageError(f"{data}: only {len(samples)} samples with attribute labels")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(samples))
    train, test = order[: int(0.7 * len(order))], order[int(0.7 * len(order)):]
    results = {}
    for enc in encoders:
        feats = torch.cat([enc.images([s["image"] for s in samples[i:i + 128]])
                           for i in range(0, len(samples), 128)]).numpy()
        per_attr = {}
        for attr in spec.attributes:
            y = np.array([str(s["json"]["attributes"][attr.kind]) for s in samples])
            clf = LogisticRegression(max_iter=2000).fit(feats[train], y[train])
            knn = KNeighborsClassifier(min(KNN_K, len(train))).fit(feats[train], y[train])
            correct = {"linear": clf.predict(feats[test]) == y[test], "knn": knn.predict(feats[test]) == y[test]}
            if enc.has_text:
                prompts = ["a photo of " + W.describe(spec, {attr.kind: v}, {attr.kind: True}) for v in attr.values]
                text = enc.texts(prompts).numpy()
                correct["zero_shot"] = np.array([str(v) for v in attr.values])[(feats @ text.T).argmax(1)] == y
            per_attr[attr.kind] = {**{k: round(100 * float(c.mean()), 2) for k, c in correct.items()},
                                   "chance": round(100 / len(attr.values), 2),
                                   "outcomes": {k: c.astype(int).tolist() for k, c in correct.items()}}
        results[enc.name] = per_attr
        log.info("%s: %s", enc.name, ", ".join(
            f"{a} " + "/".join(f"{v[k]:.0f}" for k in PROBE_TITLES if k in v) for a, v in per_attr.items()))
    return results


def plot(results: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    from eval.plots import save_png

    attrs = list(next(iter(results.values())))
    kinds = [k for k in PROBE_TITLES if any(k in per[a] for per in results.values() for a in attrs)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(max(8, 1.2 * len(kinds) * len(attrs)), 3.8), sharey=True,
                             squeeze=False)
    axes = axes[0]
    width = 0.8 / len(results)
    for ax, kind in zip(axes, kinds):
        for i, (name, per) in enumerate(results.items()):
            xs = np.arange(len(attrs)) + i * width - 0.4 + width / 2
            ax.bar(xs, [per[a].get(kind, 0) for a in attrs], width, label=name)
        for j, a in enumerate(attrs):
            chance = next(iter(results.values()))[a]["chance"]
            ax.hlines(chance, j - 0.45, j + 0.45, colors="black", linestyles="dotted")
        ax.set_xticks(np.arange(len(attrs)), attrs)
        ax.set_title(PROBE_TITLES[kind])
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("accuracy (%), dotted: chance")
    axes[-1].legend(fontsize=8)
    return save_png(fig, path)


def write_outputs(results: dict, out: str | Path) -> dict:
    """OUT/probes_samples.csv, OUT/probes.png, then OUT/probes.json: `results` with each
    attribute's "outcomes" replaced by "intervals" ({"linear", "zero_shot"}: eval.stats)."""
    from common.io import write_csv
    from eval.stats import interval

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, record = [], {}
    for name, per in results.items():
        for attr, rec in per.items():
            outcomes = rec.get("outcomes", {})
            for kind, values in outcomes.items():
                rows += ([name, attr, kind, i, v] for i, v in enumerate(values))
            record.setdefault(name, {})[attr] = {**{k: v for k, v in rec.items() if k != "outcomes"},
                                                 "intervals": {k: interval([v]) for k, v in outcomes.items()}}
    write_csv(out / SAMPLES_NAME, ["model", "attribute", "probe", "item", "correct"], rows)
    plot(record, out / "probes.png")
    write_json(out / RECORD_NAME, record, sort_keys=False)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m eval.probes", description=__doc__)
    p.add_argument("--data", required=True, help="held-out shards of the synthetic world")
    p.add_argument("--model", action="append", required=True, metavar="[NAME=]SPEC", help="a model; repeat")
    p.add_argument("--out", required=True, help="folder for probes.json and probes.png")
    p.add_argument("--max-samples", type=int, default=2000)
    args = p.parse_args(argv)
    setup_logging()
    encoders = [load_encoder(m) for m in args.model]
    results = write_outputs(probe(encoders, args.data, args.max_samples), args.out)
    attrs = list(next(iter(results.values())))
    kinds = [k for k in PROBE_TITLES if k in next(iter(results.values()))[attrs[0]]]
    print(f"{'model':<16}" + "".join(f"{a:>28}" for a in attrs))
    for name, per in results.items():
        print(f"{name:<16}" + "".join(" / ".join(f"{per[a].get(k, float('nan')):5.1f}" for k in kinds).rjust(22)
                                      + f" ({per[a]['chance']:.0f})".rjust(6) for a in attrs))
    print(f"({' / '.join(PROBE_TITLES[k] for k in kinds)} accuracy %, chance in parentheses)")
    return 0


if __name__ == "__main__":
    run_main(main, "python -m eval.probes")
