"""Peak memory of a process tree: the summed PSS of a process and all its descendants.

wait4's ru_maxrss is the largest single process's peak; a backup or restore that forks a
second process (repo/forked.py), or a restore's check workers, use the sum. PSS counts the
pages a fork shares once."""

from __future__ import annotations

import os
import threading


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass  # ended meanwhile
    return found


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory:
    """Samples the tree under `pid` every `every` seconds until stop(); `.peak_kib`."""

    def __init__(self, pid: int, every: float = 0.02) -> None:
        self.pid, self.every, self.peak_kib = pid, every, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak_kib = max(self.peak_kib, sum(_pss_kib(p) for p in _descendants(self.pid)))
            self._done.wait(self.every)

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return self.peak_kib
