"""The evaluation job of a run: MMVP-VLM, SugarCrepe-format sets, the attribute probes and
CLIP_benchmark sets of several models, in one job (each model is loaded once).

    python -m eval --models mcl=runs/r/merged.pt stage1=runs/r/stage1/model --out runs/r/eval \\
        [--mmvp data/mmvp] [--sugarcrepe data/sugar_crepe] [--probes 'data/probe/{00000..00001}.tar'] \\
        [--benchmarks wds/cars=/data/cars] [--compare mcl stage1]

A model is NAME=SPEC (eval.encoders); --compare names models, the first compared with each
other one on MMVP and SugarCrepe (paired differences, McNemar). Writes what eval.mmvp,
eval.sugarcrepe, eval.probes and eval.zeroshot write, for the benchmarks given, then
OUT/done.json: the spec and the fingerprints of the models evaluated. The job is done while
they match and its records exist.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from common.cli import UsageError, setup_logging
from common.io import write_json
from common.spec import fingerprint, from_args, param, parser, result_fields

log = logging.getLogger("eval.suite")
RECORD_NAME = "done.json"


@dataclass(frozen=True)
class EvalSpec:
    """The evaluations of some models."""
    models: tuple[str, ...] = param(help="the models, NAME=SPEC (a merged .pt, a model folder, ARCH:TAG)",
                                    result=False)  # their names and content count, not their paths
    out: str = param(help="folder for the evaluations' CSV, JSON and PNG files", result=False)
    mmvp: str | None = param(None, "MMVP-VLM folder (Questions.csv + 'MLLM_VLM Images/')")
    sugarcrepe: str | None = param(None, "SugarCrepe-format folder (<category>.json + val2017/)")
    probes: str | None = param(None, "held-out shards of the synthetic world, for the attribute probes")
    benchmarks: tuple[str, ...] = param((), "CLIP_benchmark data sets, NAME[=ROOT] (eval.zeroshot)")
    compare: tuple[str, ...] = param((), "model names: the first compared with each other one (MMVP, SugarCrepe)")


def _records(spec: EvalSpec) -> list[Path]:
    from eval import mmvp as M
    from eval import probes as P
    from eval import sugarcrepe as C
    from eval import zeroshot as Z

    return [Path(spec.out) / name for name, wanted in
            ((M.SUMMARY_NAME, spec.mmvp), (C.SUMMARY_NAME, spec.sugarcrepe), (P.RECORD_NAME, spec.probes),
             (Z.SUMMARY_NAME, spec.benchmarks)) if wanted]


def _inputs(spec: EvalSpec) -> dict:
    from eval.encoders import model_identity, parse_model_arg

    return {"models": [[parse_model_arg(m)[0], model_identity(m)] for m in spec.models]}


def is_done(spec: EvalSpec) -> bool:
    """Every record exists and done.json carries this spec and these models."""
    try:
        record = json.loads((Path(spec.out) / RECORD_NAME).read_text())
        return all(r.is_file() for r in _records(spec)) and \
            record.get("fingerprint") == fingerprint(spec, **_inputs(spec))
    except (OSError, ValueError):
        return False


def evaluate(spec: EvalSpec) -> dict:
    """Run the evaluations the spec names; returns {mmvp|sugarcrepe|probes|zeroshot: summary}."""
    import torch

    from eval import mmvp as M
    from eval import probes as P
    from eval import stats as S
    from eval import sugarcrepe as C
    from eval import zeroshot as Z
    from eval.encoders import load_encoder, parse_model_arg

    if not (spec.mmvp or spec.sugarcrepe or spec.probes or spec.benchmarks):
        raise UsageError("nothing to evaluate: give --mmvp, --sugarcrepe, --probes or --benchmarks")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    S.comparisons(spec.compare, [parse_model_arg(m)[0] for m in spec.models])  # before the models load
    sets = [Z.parse_dataset_arg(b) for b in spec.benchmarks]
    for bench in sets:
        Z.check(bench)
    compositional = C.read_sets(spec.sugarcrepe) if spec.sugarcrepe else None
    inputs = _inputs(spec)
    (Path(spec.out) / RECORD_NAME).unlink(missing_ok=True)  # the record goes first, is written last
    encoders = [load_encoder(m, device) for m in spec.models]
    result = {}
    if spec.mmvp:
        result["mmvp"] = M.write_outputs(M.evaluate(spec.mmvp, encoders), spec.out, spec.compare)
    if compositional:
        result["sugarcrepe"] = C.write_outputs(C.evaluate(compositional, encoders), spec.out, spec.compare)
    if spec.probes:
        result["probes"] = P.write_outputs(P.probe(encoders, spec.probes), spec.out)
    if sets:
        result["zeroshot"] = Z.write_outputs(Z.evaluate(sets, encoders), spec.out)
    write_json(Path(spec.out) / RECORD_NAME, {"spec": result_fields(spec), "inputs": inputs,
                                              "fingerprint": fingerprint(spec, **inputs)})
    return result


def main(argv: Sequence[str] | None = None) -> int:
    spec = from_args(EvalSpec, parser(EvalSpec, "python -m eval", __doc__).parse_args(argv))
    setup_logging()
    evaluate(spec)
    return 0
