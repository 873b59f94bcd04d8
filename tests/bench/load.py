"""Load benchmark: a node of many small files, and a repository of many snapshots.

    .venv/bin/python -m tests.bench.load [--tx-files 1000000] [--subtrees 20] [--snapshots 50] [--dir DIR]

1. Builds a sample node of `--tx-files` small tx files (plus a few subtrees and blocks), backs
   it up to a local repository and restores it, each as a child process: its peak memory (max
   RSS from wait4) and the most file descriptors it held open (sampled from /proc/<pid>/fd).
2. On a small node: `drtool snapshots` with 5 snapshots, then with `--snapshots` (50): its peak
   memory must not grow with the number of snapshots.
Targets (issue 9): peak memory < 300 MiB; open files bounded (< 256, whatever the file count);
`snapshots` memory growth 5 -> 50 snapshots < 10 %.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from drtool import config as config_mod
from tests.bench.treemem import TreeMemory

ROOT = Path(__file__).resolve().parents[2]
TARGET_RSS_MIB = 300
TARGET_OPEN_FILES = 256


def run(argv: list[str], env: dict) -> tuple[float, int, int]:
    """(seconds, peak memory in KiB, most open fds seen) of one child process: its max RSS, or
    the summed PSS of its process tree where that is more (treemem.py)."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    most_fds = 0
    done = threading.Event()

    def sample_fds() -> None:
        nonlocal most_fds
        while not done.is_set():
            try:
                most_fds = max(most_fds, len(os.listdir(f"/proc/{proc.pid}/fd")))
            except OSError:
                pass
            done.wait(0.05)

    sampler = threading.Thread(target=sample_fds, daemon=True)
    sampler.start()
    tree = TreeMemory(proc.pid)  # drtool forks a second process for a large store: the sum counts
    err = proc.stderr.read().decode(errors="replace")  # drained before wait4: no pipe deadlock
    peak_tree = tree.stop()
    _pid, status, usage = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv[3:])}: failed\n{err[-2000:]}")
    return seconds, max(usage.ru_maxrss, peak_tree), most_fds


def drtool_argv(cfg: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "drtool.cli", "-q", "--config", str(cfg), *args]


def build_node(node_dir: Path, tx_files: int, subtrees: int, blocks: int, env: dict) -> None:
    # In a child process: a child forked from a big parent would report the parent's pages.
    subprocess.run([sys.executable, "-c", "import sys; from drtool.teranode import sample; "
                    "sample.build_sample_node(sys.argv[1], seed=1, tx_files=int(sys.argv[2]), "
                    "subtrees=int(sys.argv[3]), blocks=int(sys.argv[4]), "
                    "subtree_size_range=(64 * 1024, 512 * 1024))",
                    str(node_dir), str(tx_files), str(subtrees), str(blocks)], check=True, env=env)


def write_config(path: Path, node_dir: Path, repo: Path, state: Path) -> Path:
    path.write_text(config_mod.render_toml({
        "node": {"name": "load", "data_dir": str(node_dir), "quiesce": "offline", "state_dir": str(state)},
        "repository": {"url": f"file://{repo}"},
        "blobstores": {"external": "external", "subtreestore": "subtreestore", "blockstore": "blockstore"},
    }))
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tx-files", type=int, default=1_000_000)
    ap.add_argument("--subtrees", type=int, default=20)
    ap.add_argument("--blocks", type=int, default=10)
    ap.add_argument("--snapshots", type=int, default=50)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()

    base = args.dir or Path(tempfile.mkdtemp(prefix="drtool-load-", dir="/var/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rows: list[tuple[str, float, int, int]] = []
    try:
        node_dir = base / "node"
        t = time.perf_counter()
        build_node(node_dir, args.tx_files, args.subtrees, args.blocks, env)
        files = sum(len(f) for _, _, f in os.walk(node_dir))
        print(f"sample node: {files} files (built in {time.perf_counter() - t:.0f}s)", flush=True)
        cfg = write_config(base / "drtool.toml", node_dir, base / "repo", base / "state")
        rows.append(("backup", *run(drtool_argv(cfg, "backup"), env)))
        print(f"backup done in {rows[-1][1]:.0f}s", flush=True)
        rows.append(("restore", *run(drtool_argv(cfg, "restore", "latest", "--no-teranode-checks",
                                                 "--target-dir", str(base / "restored")), env)))
        print(f"restore done in {rows[-1][1]:.0f}s", flush=True)
        rows.append(("snapshots", *run(drtool_argv(cfg, "--json", "snapshots"), env)))  # loads the whole index
        restored = sum(len(f) for _, _, f in os.walk(base / "restored"))
        shutil.rmtree(base / "restored", ignore_errors=True)

        # Many snapshots: a small node, a file changed before each backup so each is distinct.
        small = base / "small"
        build_node(small, 2000, 4, 5, env)
        small_cfg = write_config(base / "small.toml", small, base / "small-repo", base / "small-state")
        mem: dict[int, int] = {}
        for n in range(1, args.snapshots + 1):
            (small / "external" / "changing.tx").write_bytes(os.urandom(256))
            subprocess.run(drtool_argv(small_cfg, "backup", "--tag", f"n{n}"), env=env, check=True,
                           stdout=subprocess.DEVNULL)
            if n in (5, args.snapshots):
                _s, mem[n], _fds = run(drtool_argv(small_cfg, "--json", "snapshots"), env)
                _s, verify_rss, _fds = run(drtool_argv(small_cfg, "verify"), env)
                mem[-n] = verify_rss

        print()
        print(f"{'step':<10} {'seconds':>8} {'peak mem':>10} {'open fds':>9}")
        for name, seconds, rss, fds in rows:
            print(f"{name:<10} {seconds:8.1f} {rss / 1024:7.0f} MiB {fds:9d}")
        print(f"restored {restored} of {files} files")
        peak = max(r[2] for r in rows) / 1024  # backup, restore and snapshots on the big node
        most_fds = max(r[3] for r in rows)
        print(f"peak memory {peak:.0f} MiB (target < {TARGET_RSS_MIB}): {'ok' if peak < TARGET_RSS_MIB else 'OVER'}")
        print(f"most open files {most_fds} (target < {TARGET_OPEN_FILES}): "
              f"{'ok' if most_fds < TARGET_OPEN_FILES else 'OVER'}")
        growth = mem[args.snapshots] / mem[5] - 1
        print(f"`snapshots` peak RSS: {mem[5] / 1024:.1f} MiB with 5 snapshots, {mem[args.snapshots] / 1024:.1f} MiB "
              f"with {args.snapshots} ({growth:+.1%}; target < +10 %): {'ok' if growth < 0.10 else 'GROWS'}")
        print(f"`verify` peak RSS: {mem[-5] / 1024:.1f} MiB with 5 snapshots, "
              f"{mem[-args.snapshots] / 1024:.1f} MiB with {args.snapshots}")
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
