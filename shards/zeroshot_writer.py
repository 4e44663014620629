"""Write held-out shards of the synthetic world as CLIP_benchmark webdataset benchmarks.

    python -m shards.zeroshot_writer --data HELD_OUT_SHARDS OUT

- OUT/<attribute>/: a zero-shot classification set per attribute of the world; its classes
  are the attribute's values named alone as a caption names them ("some triangles", "two
  shapes", "some shapes pointing up"), its templates "a photo of {c}" and two more;
- OUT/captions/: a retrieval set, each image with its full description.
CLIP_benchmark's own writer (`clip_benchmark.webdataset_builder`) lays them out (test/N.tar,
nshards.txt, classnames.txt, zeroshot_classification_templates.txt, dataset_type.txt), so
`clip_benchmark eval --dataset wds/<attribute> --dataset_root OUT/<attribute>` reads them as
`python -m eval.zeroshot --dataset wds/<attribute>=OUT/<attribute>` does. Each set is written
under a temporary name and renamed when complete; an existing set is kept.
"""
from __future__ import annotations

import contextlib
import io
import logging
import shutil
from pathlib import Path
from typing import Sequence

from common.cli import ArgumentParser, UsageError, run_main, setup_logging
from shards import world as W
from shards.world_samples import labelled_samples, read_world

log = logging.getLogger("shards.zeroshot_writer")
RETRIEVAL = "captions"
SPLIT = "test"


def templates(spec: W.WorldSpec) -> list[str]:
    return [spec.caption_prefix + "{c}", "an image of {c}", "a picture of {c}"]


def class_names(spec: W.WorldSpec, kind: str) -> list[str]:
    """The attribute's values, each named alone as a caption names it."""
    return [W.describe(spec, {kind: v}, {kind: True}) for v in spec.attribute(kind).values]


class _Examples(list):
    """(image bytes, label) pairs with the `classes` and `templates` CLIP_benchmark's writer reads."""
    classes: list[str] | None = None
    templates: list[str] | None = None


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _write(out: Path, examples: _Examples, retrieval: bool) -> None:
    from clip_benchmark.webdataset_builder import convert_dataset, convert_retrieval_dataset

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with contextlib.redirect_stdout(io.StringIO()):  # its writer prints a line per set
        if retrieval:
            convert_retrieval_dataset(examples, SPLIT, str(tmp), image_format="png", verbose=False)
        else:
            convert_dataset(examples, SPLIT, str(tmp), image_format="png", verbose=False)
    shutil.rmtree(out, ignore_errors=True)  # an incomplete set (no nshards.txt) of an earlier try
    tmp.rename(out)


def write_sets(data: str, out: str | Path, max_samples: int = 2000) -> dict[str, Path]:
    """{set name: folder} of every set (written now or already there)."""
    spec = read_world(data, "zero-shot sets")
    out = Path(out)
    folders = {kind: out / kind for kind in spec.names} | {RETRIEVAL: out / RETRIEVAL}
    todo = {name for name, folder in folders.items() if not (folder / SPLIT / "nshards.txt").is_file()}
    if not todo:
        return folders  # a rerun reads no samples
    samples = labelled_samples(data, max_samples)
    if not samples:
        raise UsageError(f"{data}: no samples with attribute labels")
    out.mkdir(parents=True, exist_ok=True)
    images = [_png(s["image"]) for s in samples]
    for kind in spec.names:
        if kind not in todo:
            continue
        values = [str(v) for v in spec.attribute(kind).values]
        examples = _Examples((img, values.index(str(s["json"]["attributes"][kind]))) for img, s in zip(images, samples))
        examples.classes, examples.templates = class_names(spec, kind), templates(spec)
        _write(folders[kind], examples, retrieval=False)
    if RETRIEVAL in todo:
        examples = _Examples((img, [W.caption(spec, s["json"]["attributes"])]) for img, s in zip(images, samples))
        _write(folders[RETRIEVAL], examples, retrieval=True)
    log.info("zero-shot sets of %d samples in %s: %s", len(samples), out, ", ".join(folders))
    return folders


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m shards.zeroshot_writer", description=__doc__)
    p.add_argument("--data", required=True, help="held-out shards of the synthetic world (shards.generate)")
    p.add_argument("out", help="folder for the sets (one subfolder each)")
    p.add_argument("--max-samples", type=int, default=2000)
    args = p.parse_args(argv)
    setup_logging()
    for name, folder in write_sets(args.data, args.out, args.max_samples).items():
        print(f"wds/{name}={folder}")
    return 0


if __name__ == "__main__":
    run_main(main, "python -m shards.zeroshot_writer")
