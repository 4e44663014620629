"""`python -m launch COMMAND`: the project's entry point for whole runs.

Commands:
  run     run (or resume) the whole MCL DAG of a config (see launch/run.py, launch/config.py)
  status  print every step of a run with its state, job ids and log
  demo    generate the synthetic world and run the demo on it (see launch/demo.py)
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

from common.cli import ArgumentParser, run_main, setup_logging


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m launch", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo_module = __import__("launch.demo").demo
    demo = sub.add_parser("demo", help="run the demo on the synthetic world", description=demo_module.__doc__)
    demo.add_argument("--quick", action="store_true", help="the small variant the tests use")
    worlds = "; ".join(f"{name}: {config}, out {out}" for name, (config, out) in demo_module.WORLDS.items())
    demo.add_argument("--world", choices=tuple(demo_module.WORLDS),
                      help=f"the world and its demo config (default {demo_module.DEFAULT_WORLD}; {worlds})")
    demo.add_argument("--modality", choices=("clip", "image"), default="clip",
                      help="image: the unimodal demo, image-only SimCLR stages (configs/demo_image.yaml, out "
                           "runs/demo-image; with --quick demo_image_quick.yaml)")
    demo.add_argument("--config", help="demo config (default: the world's; demo_quick.yaml with --quick)")
    demo.add_argument("--out", help="run folder (default: the world's; runs/demo with --quick)")
    demo.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    demo.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the config's seeds)")
    run = sub.add_parser("run", help="run or resume the MCL DAG of a config",
                         description=__import__("launch.run").run.__doc__)
    run.add_argument("--config", required=True, help="run config (YAML; see launch/config.py)")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. stages=2 train.steps=100")
    run.add_argument("--dry-run", action="store_true", help="print the plan and executor parameters only")
    run.add_argument("--detach", action="store_true",
                     help="slurm: submit every step at once with afterok dependencies and exit")
    st = sub.add_parser("status", help="print the steps of a run")
    st.add_argument("run_dir")
    args, extra = p.parse_known_args(argv)  # key=value overrides may follow options too
    stray = [e for e in extra if args.command != "run" or "=" not in e or e.startswith("-")]
    if stray:
        p.error(f"unrecognized arguments: {' '.join(stray)}")
    if args.command == "run":
        args.overrides += extra
    setup_logging()
    if args.command == "run":
        from launch.config import load_run_config
        from launch.run import StepFailed, run as run_dag

        cfg = load_run_config(args.config, args.overrides)
        try:
            run_dag(cfg, dry_run=args.dry_run, detach=args.detach)
        except StepFailed as exc:  # the job's log has the whole story
            print(f"python -m launch: error: {exc}", file=sys.stderr)
            return 1
    elif args.command == "status":
        from launch.run import status

        for name, state, jobs, logpath in status(args.run_dir):
            print(f"{name:<20} {state:<8} {jobs:<16} {logpath}")
    elif args.command == "demo":
        from launch.demo import choose, run_demo

        run_demo(*choose(args.world, args.quick, args.config, args.out, args.modality), args.workers, args.seeds)
    return 0


if __name__ == "__main__":
    run_main(main, "python -m launch")
