"""The models the evaluations compare, as encoders: NAME=SPEC -> normalised features.

A model on an eval command line is NAME=SPEC (or SPEC alone, named after its file or
folder); SPEC is anything `pipeline.models.load` takes: a merged artifact (`.pt` from
pipeline.merge), a stage model folder, a training checkpoint (`checkpoints/step_N.pt`),
or an open_clip architecture with a pretrained tag or file (`ARCH:TAG`).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline import models


class Encoder:
    """What the evaluations need of a model: normalised image and text features."""

    def __init__(self, name: str, model, preprocess, tokenizer, device="cpu"):
        self.name, self.model, self.preprocess, self.tokenizer, self.device = name, model, preprocess, tokenizer, device

    @property
    def has_text(self) -> bool:
        """False for an image-only model (pipeline.image_model, or a merge of them)."""
        return getattr(self.model, "modality", "clip") != "image"

    @torch.no_grad()
    def images(self, pils: list) -> torch.Tensor:
        x = torch.stack([self.preprocess(p) for p in pils]).to(self.device)
        return F.normalize(self.model.encode_image(x).float(), dim=-1).cpu()

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(self.model.encode_text(self.tokenizer(texts).to(self.device)).float(), dim=-1).cpu()


def parse_model_arg(arg: str) -> tuple[str, str]:
    """NAME=SPEC -> (NAME, SPEC); SPEC alone is named after its folder or file stem."""
    name, spec = arg.split("=", 1) if "=" in arg else ("", arg)
    if not name:
        name = Path(spec).name if os.path.isdir(spec) else Path(spec).stem
    return name, spec


def add_model_options(parser) -> None:
    """The evaluations' --model (repeated) and --compare options."""
    parser.add_argument("--model", action="append", required=True, metavar="[NAME=]SPEC", help="a model; repeat")
    parser.add_argument("--compare", nargs="+", default=[], metavar="NAME",
                        help="model names: the first is compared with each other one (paired difference, McNemar)")


def check_compare(args) -> None:
    """--compare names models of --model (a UsageError naming the one that is not), before any loads."""
    from eval.stats import comparisons

    comparisons(args.compare, [parse_model_arg(m)[0] for m in args.model])


def load_encoder(arg: str, device="cpu") -> Encoder:
    """NAME=SPEC -> Encoder; raises UsageError naming the spec when it does not load."""
    name, spec = parse_model_arg(arg)
    loaded = models.load(spec, device=device)
    return Encoder(name, loaded.model, loaded.preprocess, loaded.tokenizer, device)


def model_identity(arg: str) -> str:
    """What identifies the features of a model spec, without loading it: a folder's weights
    hashed, a merged artifact's merge record, another file's bytes hashed; else the spec."""
    from pipeline.artifacts import file_fingerprint
    from pipeline.merged_model import merged_fingerprint

    _, spec = parse_model_arg(arg)
    if os.path.isdir(spec):
        return models.model_fingerprint(spec, None, "both")
    if os.path.isfile(spec):
        return merged_fingerprint(spec) or file_fingerprint(spec)
    return spec
