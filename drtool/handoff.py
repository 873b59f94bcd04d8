"""Items made in a thread of their own and taken, in order, by the caller's thread.

A bounded queue between the two keeps memory flat. Either side may stop early and the other
notices: an error in the producing thread is raised in the consuming one after the items
before it, and a consumer that stops (an error of its own, a closed generator) makes the
producer's next `put` raise Stopped, so no thread is left blocked on a full queue.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable, Iterator


class Stopped(Exception):
    """Raised by `put` once the consumer has stopped taking items."""


def produced(produce: Callable[[Callable[[Any], None]], Any], depth: int, name: str) -> Iterator[Any]:
    """Run `produce(put)` in a thread (when the first item is asked for); yield what it puts."""
    ready: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def handed(message: tuple) -> None:
        while not stop.is_set():
            try:
                ready.put(message, timeout=0.1)
                return
            except queue.Full:
                continue
        raise Stopped

    def run() -> None:
        try:
            produce(lambda item: handed(("item", item)))
            handed(("end", None))
        except Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 - raised again in the consumer's thread
            try:
                handed(("error", exc))
            except Stopped:
                pass

    producer = threading.Thread(target=run, daemon=True, name=name)
    producer.start()
    try:
        while True:
            kind, value = ready.get()
            if kind == "item":
                yield value
            elif kind == "end":
                return
            else:
                raise value
    finally:
        stop.set()  # the consumer is done (or gave up): the producer stops at its next put
        producer.join()


def read_ahead(items: Iterable[Any], depth: int, name: str = "drtool-read-ahead") -> Iterator[Any]:
    """`items`, taken from their iterator by a thread of their own, up to `depth` ahead."""

    def produce(put: Callable[[Any], None]) -> None:
        iterator = iter(items)
        try:
            for item in iterator:
                put(item)
        finally:
            close = getattr(iterator, "close", None)
            if close:
                close()  # the source's own clean-up, in the thread that ran it

    return produced(produce, depth, name)
