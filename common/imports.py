"""Keeping a heavy optional import out of processes that do not use it.

timm (imported by open_clip) runs `try: import wandb` whenever wandb is installed
(timm.utils.summary), which costs every process that imports open_clip about 2.5 s, and only
training with report_to=wandb uses W&B. `sys.modules[name] = None` makes that import raise
ImportError (the import system's documented way to block a module), which timm's own
try/except takes as "not installed"; `allow_import` lifts it before the module is really
needed.
"""
from __future__ import annotations

import sys


def skip_optional_import(name: str) -> None:
    """Until `allow_import(name)`, `import name` raises ImportError in this process."""
    if name not in sys.modules:
        sys.modules[name] = None


def allow_import(name: str) -> None:
    if name in sys.modules and sys.modules[name] is None:
        del sys.modules[name]
