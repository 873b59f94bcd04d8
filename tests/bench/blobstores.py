"""Blob-store benchmark: drtool against restic and tar|zstd on the same sample node, in one run.

    .venv/bin/python -m tests.bench.blobstores [--tx-files 100000] [--subtrees 800] [--dir DIR]
                                               [--engines native,restic]

Builds a Teranode-format sample node (100,000 tx files plus subtrees and blocks: about 1 GiB),
warms the page cache, then times on the same data:
  first backup   drtool -> local repository | restic backup -> local repository | tar -c | zstd -T0
  incremental    after +2 % files           | restic backup (same change)
  full restore   drtool restore              | restic restore
and prints each figure, the ratios drtool/restic and drtool/(tar|zstd), and drtool's and restic's
peak memory (the summed PSS of the process tree, sampled every 0.1 s for both alike, or the max
RSS from wait4 where that is more: a backup or restore forks a second process for a large
store). Every tool runs as a child process of this one.
Each tool starts after a sync, so none pays for writing back what the one before it (or
the sample's build) left dirty; the repositories are read once before the restores, so every
restore reads its repository from the page cache, as every backup reads the node.
Run it on a filesystem that has not just deleted many files: on ext4 without a journal (this
project's build machine), creating files is 20x slower for minutes after a mass delete, which
swamps every restore figure. `--dir` on a fresh (loop-mounted) ext4 avoids that.
Targets (issue 2): drtool/restic <= 0.4 first backup, <= 0.5 incremental and restore;
drtool/(tar|zstd) <= 1.5; peak memory < 300 MiB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from drtool import config as config_mod
from drtool.teranode import sample
from tests.bench.treemem import TreeMemory

ROOT = Path(__file__).resolve().parents[2]


def run(argv: list[str], env: dict | None = None, stdout=subprocess.DEVNULL, shell: bool = False,
        cwd: Path | None = None) -> tuple[float, int]:
    """(seconds, peak memory in KiB) of one child process: its max RSS, or the summed PSS of
    its process tree where that is more (treemem.py). Every tool timed is sampled alike: a
    sample costs the machine 3-4 ms of kernel time (smaps_rollup walks the page tables)."""
    os.sync()  # no tool pays for writing back what the one before it (or the sample) left dirty
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=stdout, stderr=subprocess.PIPE, shell=shell, cwd=cwd)
    tree = TreeMemory(proc.pid, every=0.1)  # drtool forks a second process for a large store: the sum counts
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""  # until it ends
    peak_tree = tree.stop()
    _pid, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv if not shell else argv}: failed\n{err[-2000:]}")
    return seconds, max(usage.ru_maxrss, peak_tree)


def drtool_argv(cfg: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "drtool.cli", "-q", "--config", str(cfg), *args]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tx-files", type=int, default=100_000)
    ap.add_argument("--subtrees", type=int, default=800)
    ap.add_argument("--blocks", type=int, default=40)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--engines", default="native,restic", help="drtool engines to time: native and/or restic")
    args = ap.parse_args()
    engines = [e for e in args.engines.split(",") if e]

    base = args.dir or Path(tempfile.mkdtemp(prefix="drtool-bench-", dir="/var/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), RESTIC_PASSWORD="bench-password", RESTIC_CACHE_DIR=str(base / "restic-cache"))
    node_dir = base / "node"
    try:
        # Built in a child process: a child forked from a big parent would report the parent's
        # pages as its own peak RSS.
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import sys; from drtool.teranode import sample; "
                        "n = sample.build_sample_node(sys.argv[1], seed=1, tx_files=int(sys.argv[2]), "
                        "subtrees=int(sys.argv[3]), blocks=int(sys.argv[4])); print(n.data_files, n.data_bytes)",
                        str(node_dir), str(args.tx_files), str(args.subtrees), str(args.blocks)],
                       check=True, env=env, stdout=subprocess.PIPE)
        files, nbytes = _du_files(node_dir)
        print(f"sample node: {files} files, {nbytes / 2**20:.0f} MiB (built in {time.perf_counter() - t:.1f}s)")
        run(f"tar -cf - -C {node_dir} . > /dev/null", shell=True)  # warm the page cache for everyone

        results: dict[str, float] = {}
        peak: dict[str, int] = {}
        cfgs = {}
        for engine in engines:
            repo = base / f"repo-{engine}"
            url = f"file://{repo}" if engine == "native" else f"restic:{repo}"
            cfg = base / f"drtool-{engine}.toml"
            cfg.write_text(config_mod.render_toml({
                "node": {"name": "bench", "data_dir": str(node_dir), "quiesce": "offline", "state_dir": str(base / "state")},
                "repository": {"url": url},  # drtool's default level (zstd 1)
                "blobstores": {"external": "external", "subtreestore": "subtreestore", "blockstore": "blockstore"},
            }))
            cfgs[engine] = cfg

        # first backup
        for engine, cfg in cfgs.items():
            results[f"drtool-{engine} backup"], peak[f"drtool-{engine} backup"] = run(drtool_argv(cfg, "backup"), env)
        restic_repo = base / "restic-plain"
        run(["restic", "init", "--repo", str(restic_repo)], env)
        results["restic backup"], peak["restic backup"] = _restic_backup(restic_repo, node_dir, env)
        for name, level in (("tar|zstd", 3), ("tar|zstd -1", 1)):  # zstd's default level, and drtool's
            results[name], _ = run(f"tar -cf - -C {node_dir} --exclude='*.tmp' --exclude=subtree_quorum . "
                                   f"| zstd -T0 -{level} -q -o {base / f'node-{level}.tar.zst'}", shell=True)

        # incremental: +2 % files
        sample.add_files(node_dir, seed=2, count=max(1, args.tx_files * 2 // 100))
        for engine, cfg in cfgs.items():
            results[f"drtool-{engine} incremental"], peak[f"drtool-{engine} incremental"] = run(drtool_argv(cfg, "backup"), env)
        results["restic incremental"], peak["restic incremental"] = _restic_backup(restic_repo, node_dir, env)

        # full restore, every repository read from the page cache (as the node was for the
        # backups): drtool writes its packs past the cache, restic and tar through it
        run(f"tar -cf - -C {base} {' '.join(f'repo-{e}' for e in cfgs)} restic-plain > /dev/null", shell=True)
        for engine, cfg in cfgs.items():
            target = base / f"restore-{engine}"
            results[f"drtool-{engine} restore"], peak[f"drtool-{engine} restore"] = run(
                drtool_argv(cfg, "restore", "latest", "--target-dir", str(target)), env)
            results[f"drtool-{engine} restore bytes-only"], peak[f"drtool-{engine} restore bytes-only"] = run(
                drtool_argv(cfg, "restore", "latest", "--no-teranode-checks", "--target-dir", str(target) + "-b"), env)
        results["restic restore"], peak["restic restore"] = run(["restic", "restore", "latest", "--repo", str(restic_repo), "-q",
                                            "--target", str(base / "restore-restic-plain")], env)

        sizes = {name: _du(path) for name, path in
                 [*((f"drtool-{e}", base / f"repo-{e}") for e in cfgs), ("restic", restic_repo),
                  ("tar|zstd", base / "node-3.tar.zst"), ("tar|zstd -1", base / "node-1.tar.zst")]}
        print()
        for name, seconds in results.items():
            mem = f"  peak memory {peak[name] / 1024:.0f} MiB" if name in peak else ""
            print(f"{name:<28} {seconds:8.2f} s{mem}")
        print()
        for name, size in sizes.items():
            print(f"repository {name:<17} {size / 2**20:8.1f} MiB")
        print()
        for engine in cfgs:
            d = f"drtool-{engine}"
            print(f"{d}/restic first backup  {results[f'{d} backup'] / results['restic backup']:.2f}  (target <= 0.4)")
            print(f"{d}/restic incremental   {results[f'{d} incremental'] / results['restic incremental']:.2f}  (target <= 0.5)")
            print(f"{d}/restic restore       {results[f'{d} restore'] / results['restic restore']:.2f}  (target <= 0.5; "
                  f"with Teranode's hash checks, which restic does not do)")
            print(f"{d}/restic restore bytes {results[f'{d} restore bytes-only'] / results['restic restore']:.2f}  "
                  f"(target <= 0.5; --no-teranode-checks: SHA-256 of every byte only)")
            print(f"{d}/(tar|zstd) backup    {results[f'{d} backup'] / results['tar|zstd']:.2f}  (target <= 1.5; "
                  f"against zstd -1, drtool's level: {results[f'{d} backup'] / results['tar|zstd -1']:.2f})")
            print(f"{d} peak memory          {max(v for k, v in peak.items() if k.startswith(d)) / 1024:.0f} MiB  (target < 300)")
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)


def _restic_backup(repo: Path, node_dir: Path, env: dict) -> tuple[float, int]:
    return run(["restic", "backup", "--repo", str(repo), "-q", "--compression", "auto",
                "--exclude", "*.tmp", "--exclude", "subtree_quorum", "."], env, cwd=node_dir)


def _du_files(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def _du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


if __name__ == "__main__":
    main()
