"""Benchmark: build a 100,000-tx sample node, then check it. Prints figures.

    .venv/bin/python -m tests.bench.bench_sample_node [DIR] [TX_FILES]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from drtool.teranode.checks import check_tree
from drtool.teranode.sample import build_sample_node


def main() -> None:
    base = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="drtool-bench-"))
    tx_files = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
    root = base / "node"
    try:
        t = time.perf_counter()
        node = build_sample_node(root, seed=1, tx_files=tx_files)
        build = time.perf_counter() - t
        files = sum(node.file_counts.values())
        print(f"build: {tx_files} tx files, {files} files, {node.total_bytes / 2**20:.1f} MiB in {build:.1f} s "
              f"({files / build:.0f} files/s)")
        t = time.perf_counter()
        tc = check_tree(root).run()
        check = time.perf_counter() - t
        print(f"check: {tc.checked} checked, {tc.unchecked} unchecked, {len(tc.findings)} findings in {check:.1f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
