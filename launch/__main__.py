"""`python -m launch COMMAND`: the project's entry point for whole runs.

Commands:
  demo   generate the synthetic world and run the demo on it (see launch/demo.py)
"""
from __future__ import annotations

import os
from typing import Sequence

from shards.cli import ArgumentParser, run_main, setup_logging


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m launch", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="run the demo on the synthetic world",
                          description=__import__("launch.demo").demo.__doc__)
    demo.add_argument("--quick", action="store_true", help="the small variant the tests use")
    demo.add_argument("--config", help="demo config (default: configs/demo.yaml, or demo_quick.yaml)")
    demo.add_argument("--out", default="runs/demo", help="run folder")
    demo.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    args = p.parse_args(argv)
    setup_logging()
    if args.command == "demo":
        from launch.demo import CONFIGS, run_demo

        run_demo(args.config or CONFIGS[args.quick], args.out, args.workers)
    return 0


if __name__ == "__main__":
    run_main(main, "python -m launch")
