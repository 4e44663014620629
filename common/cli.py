"""Command-line conventions shared by every job of the project.

A bad option, a missing path or an empty shard list ends the command with one line on
stderr (`prog: error: ...`) and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence


class UsageError(Exception):
    """Bad input the user can fix: printed as one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error and the defaults shown in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _not_library_chatter(record: logging.LogRecord) -> bool:
    """open_clip logs its every step of model creation at INFO on the root logger."""
    return record.levelno >= logging.WARNING or "open_clip" not in record.pathname


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_not_library_chatter)
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def run_main(main: Callable[[Sequence[str] | None], int | None], prog: str,
             argv: Sequence[str] | None = None) -> None:
    """Run a command's `main`, turning UsageError into one line and exit code 2."""
    try:
        code = main(argv)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
