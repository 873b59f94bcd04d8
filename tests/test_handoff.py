"""drtool.handoff: items from a thread of their own, and the Aerospike writer pumped through it."""

from __future__ import annotations

import random
import threading

import pytest

from drtool import handoff
from drtool.sources.aerospike import _pump_writes


def _alive(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


def test_a_writer_pumped_through_comes_out_in_chunks_with_its_result():
    data = random.Random(1).randbytes((3 << 20) + 12345)

    def produce(f):
        view, rng = memoryview(data), random.Random(2)
        while view:
            n = rng.randrange(1, 300_000)
            f.write(bytes(view[:n]))
            view = view[n:]
        return {"sets": {"utxos": 7}}

    chunks, result = _pump_writes(produce, max_chunks=2)
    got = list(chunks)
    assert b"".join(got) == data and all(len(c) >= 1 << 20 for c in got[:-1])
    assert result["value"] == {"sets": {"utxos": 7}}


def test_a_writers_error_comes_after_its_chunks_and_a_consumer_that_stops_stops_the_writer():
    def fails(f):
        f.write(b"x" * (2 << 20))
        raise OSError("scan lost its node")

    got = []
    with pytest.raises(OSError, match="scan lost its node"):
        for chunk in _pump_writes(fails)[0]:
            got.append(chunk)
    assert b"".join(got) == b"x" * (2 << 20)

    seen = []

    def endless(f):
        try:
            while True:
                f.write(b"y" * (1 << 20))
        except handoff.Stopped:
            seen.append("stopped")
            raise

    chunks, _ = _pump_writes(endless, max_chunks=2)
    assert next(chunks) == b"y" * (1 << 20)
    chunks.close()  # e.g. the repository failed: the scan must not block on a full queue
    assert seen == ["stopped"] and not _alive("drtool-aerospike-scan")


def test_read_ahead_closes_its_source_in_its_own_thread():
    closed_in = []

    def source():
        try:
            yield from range(100)
        finally:
            closed_in.append(threading.current_thread().name)

    items = handoff.read_ahead(source(), depth=3, name="test-ahead")
    assert [next(items) for _ in range(5)] == [0, 1, 2, 3, 4]
    items.close()
    assert closed_in == ["test-ahead"] and not _alive("test-ahead")
    assert list(handoff.read_ahead(iter(range(10)), depth=2)) == list(range(10))
