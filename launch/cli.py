"""`mcl COMMAND [options]`: the console command installed with the project (`pip install -e .`).

Each command is a module's own command line (`mcl cluster --help` is `python -m
pipeline.cluster --help`):

  whole runs   run, status, demo                      (python -m launch ...)
  jobs         train, save, embed, cluster, assign,   (python -m pipeline.<job>;
               reduce, regroup, merge, eval            eval: python -m eval)
  tools        world, validate, from-files,           (python -m shards.generate, .validate,
               mmvp-bench, sugarcrepe-bench, mmvp,     .from_files, .mmvp_writer, .sugarcrepe_writer;
               sugarcrepe, probes, zeroshot            eval.mmvp, eval.sugarcrepe, ...)
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

WHOLE_RUNS = ("run", "status", "demo")
JOBS = {"train": "pipeline.train", "save": "pipeline.save", "embed": "pipeline.embed",
        "cluster": "pipeline.cluster", "assign": "pipeline.assign", "reduce": "pipeline.reduce",
        "regroup": "pipeline.regroup", "merge": "pipeline.merge", "eval": "eval.suite"}
TOOLS = {"world": "shards.generate", "validate": "shards.validate", "from-files": "shards.from_files",
         "mmvp-bench": "shards.mmvp_writer", "sugarcrepe-bench": "shards.sugarcrepe_writer",
         "mmvp": "eval.mmvp", "probes": "eval.probes",
         "zeroshot": "eval.zeroshot", "sugarcrepe": "eval.sugarcrepe"}


def module_of(command: str) -> str:
    return "launch.__main__" if command in WHOLE_RUNS else {**JOBS, **TOOLS}[command]


def main(argv: Sequence[str] | None = None) -> None:
    from common.cli import run_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: mcl COMMAND [options]   (mcl COMMAND --help)\n\n{__doc__.split(chr(10), 2)[2]}",
              file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in WHOLE_RUNS and command not in JOBS and command not in TOOLS:
        print(f"mcl: error: unknown command {command!r} (see mcl --help)", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(module_of(command))
    if command in WHOLE_RUNS:
        run_main(module.main, "mcl", [command, *rest])
    run_main(module.main, f"mcl {command}", rest)


if __name__ == "__main__":
    main()
