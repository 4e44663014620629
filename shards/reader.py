"""Reading webdataset shards the way real img2dataset output needs.

Shard specs: `data/{00000..00099}.tar` (brace-expanded), several joined with `::` (as
open_clip does), a local folder (its `*.tar`), and any URL webdataset's `gopen` opens
(`pipe:cmd`, `http(s)://`, `gs://`, ...); other schemes (`s3://`, `memory://`, ...) go
through fsspec.

Problems real shards contain are counted, logged once each with shard and key, and the
sample is skipped; a job never dies in the middle of a shard:

| kind              | what                                                          |
|-------------------|---------------------------------------------------------------|
| unreadable_shard  | the shard cannot be opened or read (missing file, failed      |
|                   | command, an I/O error midway: the samples before it count)    |
| empty_tar         | zero bytes                                                    |
| corrupt_tar       | not a tar archive                                             |
| truncated_tar     | the archive stops early; the complete samples before it count |
| missing_image     | a key with no .jpg/.jpeg/.png/.webp (e.g. failed download)    |
| missing_caption   | a key with no .txt                                            |
| duplicate_key     | a key seen before in the same shard (the first one is kept)   |
| bad_text_encoding | a caption that is not UTF-8                                   |
| empty_caption     | a caption that is empty or only white space                   |
| corrupt_image     | an image that does not decode (checked when images decode)    |
| bad_json          | unparsable .json: counted, the sample kept with json = None   |

The stages are webdataset pipeline filters, so they compose with its shard lists,
node/worker splitters and shuffles:

    wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker,
                     tar_samples(problems), check_samples(problems), decode_images(problems))

Samples come out as {"__key__", "__url__", "image" (bytes, or PIL after decode_images),
"image_ext", "text" (str), "json" (dict or None)}. A job that reads no caption (image-only
training, the embedding by an image-only model, the probes) passes `captions=False`: a sample
without a caption is then a good one, with text "". Counting a shard's samples by reading it
(`shard_sizes` without sizes.json) counts those with a caption: image-only data needs its
sizes.json (`shards.validate --no-captions` writes it).
"""
from __future__ import annotations

import collections
import glob
import io
import json
import logging
import os
import tarfile
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Sequence
from urllib.parse import urlparse

import braceexpand
import webdataset as wds
from PIL import Image
from webdataset.gopen import gopen, gopen_schemes

from common.cli import UsageError

log = logging.getLogger("shards.reader")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SHARD_PROBLEMS = ("unreadable_shard", "empty_tar", "corrupt_tar", "truncated_tar")
SAMPLE_PROBLEMS = ("missing_image", "missing_caption", "duplicate_key", "bad_text_encoding",
                   "empty_caption", "corrupt_image", "bad_json")
PROBLEM_KINDS = SHARD_PROBLEMS + SAMPLE_PROBLEMS
SKIPPING = set(PROBLEM_KINDS) - {"bad_json"}


# --- shard specs ----------------------------------------------------------------------


def is_local(url: str) -> bool:
    scheme = urlparse(url).scheme
    return scheme in ("", "file") or len(scheme) == 1  # "C:" style drive letters


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """Expand a shard spec into URLs; local paths must exist. Raises UsageError."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for part in parts:
        for sub in str(part).split("::"):
            sub = sub.strip()
            if not sub:
                continue
            for url in braceexpand.braceexpand(sub):
                if not is_local(url) or url == "-":
                    urls.append(url)
                    continue
                path = urlparse(url).path if url.startswith("file:") else url
                if os.path.isdir(path):
                    found = sorted(glob.glob(os.path.join(path, "*.tar")))
                    if not found:
                        raise UsageError(f"{path}: folder holds no .tar shards")
                    urls.extend(found)
                elif os.path.exists(path):
                    urls.append(url)
                else:
                    raise UsageError(f"{path}: no such shard")
    if not urls:
        raise UsageError(f"shard spec {spec!r} names no shards")
    return urls


def open_stream(url: str):
    """Open a shard for reading: webdataset's gopen, or fsspec for schemes gopen lacks."""
    scheme = urlparse(url).scheme
    if is_local(url) or url == "-" or scheme in gopen_schemes:
        return gopen(url, "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


# --- problems -------------------------------------------------------------------------


class ProblemLog:
    """Counts problems, each (kind, shard, key) once, and logs the first few of each kind."""

    def __init__(self, max_logged_per_kind: int = 20, logger: logging.Logger | None = log):
        self.max_logged = max_logged_per_kind
        self.logger = logger
        self.counts: collections.Counter = collections.Counter()
        self.per_shard: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.items: list[dict] = []
        self.logged: collections.Counter = collections.Counter()  # per kind, across restarts
        self._seen: set = set()

    def add(self, kind: str, url: str, key: str | None = None, detail: str = "") -> None:
        assert kind in PROBLEM_KINDS, kind
        ident = (kind, url, key)
        if ident in self._seen:
            return
        self._seen.add(ident)
        self.counts[kind] += 1
        self.per_shard[url][kind] += 1
        self.items.append({"kind": kind, "shard": url, "key": key, "detail": detail})
        if self.logger is None:
            return
        self.logged[kind] += 1
        n = self.logged[kind]
        where = f"{url}" + (f" key {key}" if key is not None else "")
        if n <= self.max_logged:
            self.logger.warning("%s: %s%s, skipped", where, kind, f" ({detail})" if detail else "")
        if n == self.max_logged:
            self.logger.warning("further %s problems are counted but not logged", kind)

    def restart(self) -> None:
        """Count from zero on; a problem met before is still not counted (nor logged) again."""
        self.counts.clear()
        self.per_shard.clear()
        self.items.clear()

    def known(self, kind: str, where: Iterable[tuple[str, str]]) -> None:
        """(shard, key) pairs whose `kind` problem, if they have one, was counted elsewhere (by the
        process before a resume): not counted here."""
        self._seen.update((kind, url, key) for url, key in where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_list(self) -> list[int]:
        """The counts in PROBLEM_KINDS order (what a DataLoader worker passes on with its batches)."""
        return [self.counts[k] for k in PROBLEM_KINDS]

    def summary(self) -> str:
        if not self.counts:
            return "no problems"
        return ", ".join(f"{k}={self.counts[k]}" for k in PROBLEM_KINDS if self.counts[k])


# --- stages ---------------------------------------------------------------------------


class _WatchedTarInfo(tarfile.TarInfo):
    """Notes a proper end-of-archive block: Python's tarfile treats a truncated stream
    as a silent end, so without this a cut-off shard would look complete."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:
            tf.mcl_clean_end = True
            raise


def tar_members(url: str, problems: ProblemLog) -> Iterator[tuple[str, bytes, int, int]]:
    """(member name, bytes, start, end) of one shard's regular files, [start, end) the bytes
    of the member in the tar (its headers, long-name ones included, and its padded data);
    shard problems are recorded."""
    try:
        stream = open_stream(url)
    except Exception as exc:  # noqa: BLE001 - any opener failure is the shard's problem
        problems.add("unreadable_shard", url, detail=_short(exc))
        return
    n, error = 0, None
    try:
        with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_WatchedTarInfo) as tf:
            tf.mcl_clean_end = False
            for info in tf:
                if not info.isreg():
                    continue
                data = tf.extractfile(info).read()
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {info.name} has {len(data)} of {info.size} bytes")
                n += 1
                yield info.name, data, info.offset, info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if not tf.mcl_clean_end:
                raise tarfile.ReadError(f"archive ends without an end-of-archive block after {n} files")
    except Exception as exc:  # noqa: BLE001 - whatever the stream raises is this shard's problem
        error = exc
    finally:
        close_error = None
        try:
            getattr(stream, "close", lambda: None)()
        except Exception as exc:  # noqa: BLE001 - e.g. a pipe: command that exited non-zero
            close_error = exc
        if close_error is not None:  # e.g. a pipe: command that failed, at once or after some output
            detail = _short(close_error) + (f"; {n} files read before it" if n else "")
            problems.add("unreadable_shard", url, detail=detail)
        elif error is not None:
            detail = _short(error) + (f"; {n} files read before it" if n else "")
            problems.add(_classify(error, n), url, detail=detail)


def _classify(exc: Exception, files_read: int) -> str:
    msg = str(exc)
    if not isinstance(exc, (tarfile.TarError, EOFError)):
        return "unreadable_shard"  # the stream itself failed (an I/O error), at the start or midway: not the tar
    if files_read == 0 and "empty file" in msg:
        return "empty_tar"
    if files_read == 0 and ("invalid header" in msg or "checksum" in msg):
        return "corrupt_tar"
    return "truncated_tar"


def _split_name(name: str) -> tuple[str | None, str]:
    base = os.path.basename(name)
    if "." not in base:
        return None, ""
    dirname = os.path.dirname(name)
    stem, ext = base.split(".", 1)
    return (f"{dirname}/{stem}" if dirname else stem), ext.lower()


def group_members(members: Iterable[tuple[str, bytes, int, int]], url: str, problems: ProblemLog) -> Iterator[dict]:
    """Group consecutive members by key (webdataset's convention) into raw samples; each
    sample's `__span__` is the (start, end) of its members' bytes in the tar (for
    `read_span`).

    A key seen before in the shard, or a member repeating a suffix of the current key,
    starts a new sample that is dropped as a duplicate_key.
    """
    seen: set[str] = set()
    current: dict | None = None
    for name, data, start, end in members:
        key, ext = _split_name(name)
        if key is None or key.startswith("__"):
            continue
        if current is None or key != current["__key__"] or ext in current:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": url, "__duplicate__": key in seen, "__span__": (start, end)}
            seen.add(key)
        current[ext] = data
        current["__span__"] = (current["__span__"][0], end)
    if current is not None:
        yield current


def read_span(file: BinaryIO, url: str, start: int, end: int) -> dict:
    """The raw sample whose members lie at bytes [start, end) of an uncompressed tar open
    as `file` (a sample's `__span__`): one read, as random access by index needs."""
    file.seek(start)
    data = file.read(end - start)
    if len(data) != end - start:
        raise tarfile.ReadError(f"{url}: bytes {start}-{end} are past the end of the shard")
    members = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tf:
        for info in tf:
            if info.isreg():
                members.append((info.name, tf.extractfile(info).read(), start + info.offset, start + info.offset_data))
    samples = list(group_members(members, url, ProblemLog()))
    if len(samples) != 1:
        raise tarfile.ReadError(f"{url}: bytes {start}-{end} hold {len(samples)} samples, not one (a stale index?)")
    return samples[0]


def _tar_samples(urls: Iterable[Any], problems: ProblemLog) -> Iterator[dict]:
    for item in urls:
        url = item["url"] if isinstance(item, dict) else item
        yield from group_members(tar_members(url, problems), url, problems)


def _check_samples(samples: Iterable[dict], problems: ProblemLog, captions: bool = True) -> Iterator[dict]:
    """Good samples of raw ones, each problem counted. Without `captions` (image-only
    training) a sample needs no caption: its "text" is its caption if it has a readable one,
    else ""."""
    for raw in samples:
        url, key = raw["__url__"], raw["__key__"]
        if raw.get("__duplicate__"):
            problems.add("duplicate_key", url, key)
            continue
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if ext is None:
            problems.add("missing_image", url, key)
            continue
        text = _caption(raw, problems) if captions else _text_or_empty(raw.get("txt"))
        if text is None:
            continue
        meta = None
        if "json" in raw:
            try:
                meta = json.loads(raw["json"])
            except ValueError as exc:
                problems.add("bad_json", url, key, _short(exc))
        yield {"__key__": key, "__url__": url, "__span__": raw.get("__span__"), "image": raw[ext], "image_ext": ext,
               "text": text, "json": meta}


def _caption(raw: dict, problems: ProblemLog) -> str | None:
    """The sample's caption; None (the problem counted) when it has no usable one."""
    url, key = raw["__url__"], raw["__key__"]
    if "txt" not in raw:
        problems.add("missing_caption", url, key)
        return None
    try:
        text = raw["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        problems.add("bad_text_encoding", url, key, _short(exc))
        return None
    if not text:
        problems.add("empty_caption", url, key)
        return None
    return text


def _text_or_empty(data: bytes | None) -> str:
    try:
        return data.decode("utf-8").strip() if data is not None else ""
    except UnicodeDecodeError:
        return ""


def decode_image(data: bytes, mode: str = "RGB") -> Image.Image:
    """Decode fully (a truncated JPEG fails here, not later in a transform)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert(mode)


def _decode_images(samples: Iterable[dict], problems: ProblemLog, mode: str = "RGB") -> Iterator[dict]:
    for s in samples:
        try:
            img = decode_image(s["image"], mode)
        except Exception as exc:  # noqa: BLE001 - PIL raises many kinds
            problems.add("corrupt_image", s["__url__"], s["__key__"], _short(exc))
            continue
        yield {**s, "image": img}


tar_samples = wds.pipelinefilter(_tar_samples)
check_samples = wds.pipelinefilter(_check_samples)
decode_images = wds.pipelinefilter(_decode_images)


def good_samples(problems: ProblemLog, decode: bool = False, captions: bool = True) -> list:
    """The pipeline stages from shard URLs to good samples (every problem counted in
    `problems`), for every job that reads shards: tar_samples, check_samples (without
    `captions`, a sample needs none) and, with `decode`, decode_images."""
    return [tar_samples(problems), check_samples(problems, captions=captions)] + \
        ([decode_images(problems)] if decode else [])


def read_samples(spec: str | Sequence[str], problems: ProblemLog | None = None, *,
                 decode: bool = True, split: bool = False, captions: bool = True) -> Iterator[dict]:
    """All good samples of a spec, in shard order (without `captions`, a sample needs none).
    `split` divides shards over torch.distributed ranks and DataLoader workers."""
    problems = problems if problems is not None else ProblemLog()
    stages: list = [wds.SimpleShardList(expand_urls(spec))]
    if split:
        stages += [wds.split_by_node, wds.split_by_worker]
    return iter(wds.DataPipeline(*stages, *good_samples(problems, decode, captions)))


def shard_basename(url: str) -> str:
    return os.path.basename(urlparse(url).path) if not is_local(url) else os.path.basename(url)


def local_path(url: str) -> Path:
    """The file of a local shard URL (a path, or file:...)."""
    return Path(urlparse(url).path if url.startswith("file:") else url)


def local_sibling(url: str, suffix: str) -> Path | None:
    """`00000.tar` -> `00000<suffix>` beside it, for local shards; None otherwise."""
    if not is_local(url):
        return None
    path = local_path(url)
    stem = path.name.split(".", 1)[0]
    return path.with_name(stem + suffix)


def count_samples(urls: Sequence[str]) -> int:
    """Samples in the shards (`shard_sizes`)."""
    return sum(shard_sizes(urls))


def _read_remote_json(url: str):
    """A small JSON file at a URL (fsspec: http(s), s3, gs, ...); None when there is none."""
    import fsspec

    try:
        with fsspec.open(url, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{url}: cannot read ({_short(exc)})") from None


def _remote_size(url: str, cache: dict) -> int:
    """Samples in a remote shard: its folder's sizes.json, else its img2dataset stats, at
    the same URL (a remote tar is not read whole to count it)."""
    folder, name = url.rsplit("/", 1)
    sizes_url = f"{folder}/sizes.json"
    if sizes_url not in cache:
        cache[sizes_url] = _read_remote_json(sizes_url)
    if cache[sizes_url] is not None:
        if name not in cache[sizes_url]:
            raise UsageError(f"{sizes_url}: has no entry for {name}; rerun shards.validate")
        return int(cache[sizes_url][name])
    stats_url = f"{folder}/{name.split('.', 1)[0]}_stats.json"
    stats = _read_remote_json(stats_url)
    try:
        return int(stats["successes"])
    except TypeError:
        raise UsageError(f"{url}: neither {sizes_url} nor {stats_url} exists; write sizes.json beside the "
                         f"shards (python -m shards.validate --sizes) or set train_num_samples") from None
    except (ValueError, KeyError) as exc:
        raise UsageError(f"{stats_url}: no img2dataset 'successes' count ({exc}); run "
                         "`python -m shards.validate` or set train_num_samples") from None


def shard_sizes(urls: Sequence[str]) -> list[int]:
    """Samples in each shard, from the sizes.json beside them (as open_clip reads it), or
    else from img2dataset's `<shard>_stats.json` (its `successes`: the samples it wrote),
    local or at the shards' URL (http(s), s3, gs: fsspec), or else, for a local shard
    (img2dataset interrupted in its last shard writes the tar but no stats), counted by
    reading the tar, with a warning naming the shard."""
    sizes, cache = [], {}
    for url in urls:
        shard = local_sibling(url, ".tar")
        if shard is None:
            if url.startswith("pipe:") or "/" not in url:
                raise UsageError(f"{url}: the sample count of a pipe: shard is unknown; set train_num_samples")
            sizes.append(_remote_size(url, cache))
            continue
        sizes_file = shard.parent / "sizes.json"
        name = shard_basename(url)
        if sizes_file.exists():
            if sizes_file not in cache:
                cache[sizes_file] = json.loads(sizes_file.read_text())
            if name not in cache[sizes_file]:
                raise UsageError(f"{sizes_file}: has no entry for {name}; rerun shards.validate")
            sizes.append(int(cache[sizes_file][name]))
            continue
        stats_file = local_sibling(url, "_stats.json")
        try:
            sizes.append(int(json.loads(stats_file.read_text())["successes"]))
        except FileNotFoundError:
            quiet = ProblemLog(logger=None)
            n = sum(1 for _ in _check_samples(_tar_samples([url], quiet), quiet))
            log.warning("%s: neither sizes.json nor %s beside the shard (img2dataset interrupted?): "
                        "%d samples counted by reading it", url, stats_file.name, n)
            sizes.append(n)
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{stats_file}: no img2dataset 'successes' count ({exc}); run "
                             "`python -m shards.validate` or set train_num_samples") from None
    return sizes


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
