"""Producing items in a background thread: batch reading overlaps the work on the batches.
Used by the feature pipeline (fklip/pipeline.py) and by training's batch reading."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

AHEAD = 2  # batches prepared ahead of the runner
_POLL_S = 0.05  # how often a blocked reader checks whether it should stop

T = TypeVar("T")


@contextmanager
def in_background(items: Iterable[T], ahead: int = AHEAD, enabled: bool = True) -> Iterator[Iterator[T]]:
    """Produce `items` in a thread, at most `ahead` ready and waiting; yield an iterator over them.

    An exception raised while producing is re-raised in the caller, at the item it replaced. On
    leaving the block (normally, by an exception, or early) the thread is stopped and joined.
    Not `enabled`: the items are produced in the caller's thread, as it iterates.
    """
    if not enabled:
        yield iter(items)
        return
    ready: queue.Queue = queue.Queue(maxsize=ahead)
    stop = threading.Event()

    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the caller, who re-raises it
            put(("error", e))
            return
        finally:
            close = getattr(items, "close", None)
            if close is not None:  # a generator stopped early runs its cleanup here, in its thread
                close()
        put(("done", None))

    def consume() -> Iterator[T]:
        while True:
            kind, value = ready.get()
            if kind == "item":
                yield value
            elif kind == "error":
                raise value
            else:
                return

    thread = threading.Thread(target=produce, name="fklip-batches", daemon=True)
    thread.start()
    try:
        yield consume()
    finally:
        stop.set()
        thread.join()
