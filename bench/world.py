"""The benchmarks' data: shards of the default synthetic world (configs/worlds/default.yaml)."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def default_world_shards(data: str | None, scratch: Path, samples: int) -> Path:
    """`data` when given (shards of the default world), else `samples` of it generated in scratch/data."""
    if data:
        return Path(data)
    from shards.generate import generate
    from shards.world import load_spec

    out = scratch / "data"
    generate(out, load_spec(str(REPO / "configs/worlds/default.yaml")), samples, 1000, seed=0, workers=2,
             progress=False)
    return out
