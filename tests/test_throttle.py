"""Token bucket waits (with an injected clock) and the concurrency cap of ThrottledStore."""

from __future__ import annotations

import threading
import time

from drtool.repo.objectstore import LocalStore
from drtool.throttle import ThrottledStore, TokenBucket, throttle_store
from drtool.policy import ThrottlePolicy


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_bucket_waits_for_the_debt():
    clock = FakeClock()
    b = TokenBucket(100, clock=clock, sleep=clock.sleep)
    assert b.reserve(100) == 0          # the one-second burst
    assert b.reserve(50) == 0.5         # 50 bytes of debt at 100 B/s
    clock.now += 0.5
    assert b.reserve(50) == 0.5
    clock.now += 10                     # idle time refills only up to the burst
    assert b.reserve(100) == 0
    assert b.reserve(1000) == 10.0      # a large request passes, its debt delays what follows


def test_long_run_rate_is_the_limit():
    clock = FakeClock()
    b = TokenBucket(1000, clock=clock, sleep=clock.sleep)
    for _ in range(100):
        b.consume(100)                  # 10 000 bytes
    assert 8.9 <= clock.now <= 9.1      # the first second was burst


def test_throttled_store_paces_uploads_and_downloads(tmp_path):
    clock = FakeClock()
    store = ThrottledStore(LocalStore(tmp_path), upload_rate=1000, download_rate=500, clock=clock, sleep=clock.sleep)
    store.put("a", b"x" * 3000)
    assert abs(clock.now - 2.0) < 1e-9  # 3000 B at 1000 B/s, 1000 of them burst
    assert store.put_if_absent("b", b"y" * 1000)
    assert store.put_stream("c", [b"z" * 500] * 4) == 2000
    assert abs(clock.now - 5.0) < 1e-9
    assert store.get("a") == b"x" * 3000
    assert abs(clock.now - 10.0) < 1e-9  # 3000 B down at 500 B/s, 500 burst
    assert store.get_range("c", 0, 10) == b"z" * 10
    with store.open_read("b") as f:
        assert f.read() == b"y" * 1000
    assert [i.key for i in store.list()] == ["a", "b", "c"]
    store.delete("c")
    assert store.stat("c") is None
    assert store.stale_temp_files(0) == []  # delegated


class SlowStore(LocalStore):
    def __init__(self, root):
        super().__init__(root)
        self.active = 0
        self.peak = 0
        self.lock = threading.Lock()

    def put(self, key, data):
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        time.sleep(0.05)
        super().put(key, data)
        with self.lock:
            self.active -= 1


def test_concurrency_cap(tmp_path):
    inner = SlowStore(tmp_path)
    store = ThrottledStore(inner, max_concurrent=2)
    threads = [threading.Thread(target=store.put, args=(f"k{i}", b"d")) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert inner.peak == 2
    assert len(list(store.list())) == 8


def test_throttle_store_from_policy(tmp_path):
    inner = LocalStore(tmp_path)
    assert throttle_store(inner, ThrottlePolicy()) is inner
    wrapped = throttle_store(inner, ThrottlePolicy(upload=1 << 20, max_concurrent_requests=4))
    assert isinstance(wrapped, ThrottledStore)
    assert throttle_store(wrapped, ThrottlePolicy(upload=1)) is wrapped  # never wrapped twice
