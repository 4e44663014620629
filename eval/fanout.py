"""One pass over an iterable for several consumers that each want to loop over all of it.

CLIP_benchmark's metric functions each take a DataLoader and run the loop themselves; to
evaluate N models on one data set with one decoding pass, each function runs in a thread
of its own on a view of the pass (`fan_out`). A view holds at most `depth` items ahead of
its consumer; the items are shared, not copied, so the pass holds about depth + 2 of them
at a time, and the slowest consumer sets the pace. What the consumers keep (logits,
embeddings, activations) is held for all of them at once.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

log = logging.getLogger("eval.fanout")
R = TypeVar("R")
_END = object()


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _View:
    """One consumer's iterator over the pass."""

    def __init__(self, depth: int):
        self.queue, self.ended = queue.Queue(maxsize=depth), False

    def __iter__(self) -> Iterator:
        while not self.ended:
            item = self.queue.get()
            if item is _END:
                self.ended = True
            elif isinstance(item, _Failed):
                raise RuntimeError("the shared data pass stopped") from item.exc
            else:
                yield item

    def drain(self) -> None:
        """Take the rest of the pass off the queue (the consumer is gone)."""
        while not self.ended:
            self.ended = self.queue.get() is _END


def fan_out(items: Iterable, consumers: Sequence[Callable[[Iterator], R]], depth: int = 2) -> list[R]:
    """[consumer(view) for consumer in consumers], each view yielding every item of `items`
    in order, `items` iterated once (its iterator made before any thread starts: a DataLoader
    forks its workers there). A consumer's exception stops the pass; the first one (or the
    pass's own) is raised once all threads have ended, any others are logged."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if len(consumers) == 1:
        return [consumers[0](iter(items))]
    source = iter(items)
    views = [_View(depth) for _ in consumers]
    results: list = [None] * len(consumers)
    errors: list[BaseException] = []
    failed = threading.Event()

    def run(i: int) -> None:
        try:
            results[i] = consumers[i](iter(views[i]))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            errors.append(exc)
            failed.set()
        finally:
            views[i].drain()

    threads = [threading.Thread(target=run, args=(i,), daemon=True, name=f"fan_out-{i}")
               for i in range(len(consumers))]
    for t in threads:
        t.start()
    failure = None
    try:
        for item in source:
            if failed.is_set():
                raise RuntimeError("a consumer of the shared pass failed")
            for view in views:
                view.queue.put(item)
    except BaseException as exc:  # noqa: BLE001 - the consumers see it first, then the caller
        failure = exc
        for view in views:
            view.queue.put(_Failed(exc))
    for view in views:
        view.queue.put(_END)
    for t in threads:
        t.join()
    consumer_errors = [e for e in errors if not (isinstance(e, RuntimeError) and e.__cause__ is failure)]
    first = consumer_errors[0] if consumer_errors else failure
    for exc in consumer_errors[1:]:
        log.error("another consumer of the shared pass failed too: %r", exc)
    if first is not None:
        raise first
    return results
