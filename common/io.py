"""Atomic file output: a half-written file (or folder) never replaces a good one.

Every job of the project writes through these helpers: the data goes to a temporary
file in the destination folder, is flushed to disk, and is renamed over the target
only once complete, so a killed job leaves either the old file or the new one.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Sequence

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would have given; mkstemp uses 0600


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` for libraries that write by file name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, FILE_MODE)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path` to fill; on success it is renamed to `path` (which
    must not exist), on failure removed."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        tmp.chmod(0o777 & ~_UMASK)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_csv(path: str | os.PathLike, header: Sequence, rows: Iterable[Sequence]) -> None:
    """Write a header row and `rows` as CSV (the csv module's default dialect), atomically."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    with atomic_output(path, "w") as f:
        f.write(buf.getvalue())


def write_json(path: str | os.PathLike, obj: Any, sort_keys: bool = True, if_changed: bool = False) -> None:
    """Write `obj` as indented JSON (keys sorted unless their order means something), atomically.
    With `if_changed`, a file that already holds the same content is left alone (and its mtime)."""
    if if_changed:
        try:
            if json.loads(Path(path).read_text()) == json.loads(json.dumps(obj)):
                return
        except (OSError, ValueError):
            pass
    with atomic_output(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=sort_keys)
        f.write("\n")


def read_yaml(path: str | os.PathLike, what: str = "file") -> Any:
    """Parse a YAML file; a missing file or bad YAML is a ValueError naming the path."""
    import yaml

    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read {what} ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc


PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the clone, or site-packages once installed


def project_file(path: str | os.PathLike) -> Path:
    """`path` as given when it exists; a relative path that does not is looked up among the
    project's own files (configs/ is installed with the packages), e.g. configs/demo_quick.yaml
    from any folder."""
    given = Path(path)
    if given.exists() or given.is_absolute() or not (PROJECT_ROOT / given).exists():
        return given
    return PROJECT_ROOT / given
