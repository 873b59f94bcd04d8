"""`drtool demo`: the whole job on an embedded default.

A deterministic Teranode-format sample node is built, backed up to a local repository,
verified (every byte read), grown by 2 % and backed up again (incremental), restored into a
fresh folder and checked: byte-identical to the node, and Teranode's own hashes hold.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from drtool import config as config_mod
from drtool import restore as restore_mod
from drtool import snapshot, verify
from drtool.errors import ConfigError
from drtool.repo import open_repository

MARKER = ".drtool-demo"


def _prepare(directory: Path) -> None:
    """Use DIR only if it is empty or an earlier demo's (which is then started afresh)."""
    if directory.exists():
        if not directory.is_dir():
            raise ConfigError(f"demo directory {directory}: exists and is not a directory")
        if any(directory.iterdir()) and not (directory / MARKER).exists():
            raise ConfigError(f"demo directory {directory}: not empty and not an earlier demo's; choose another")
        for child in directory.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MARKER).write_text("made by drtool demo; removed and rebuilt by the next demo\n")


def tree_digest(root: Path) -> dict[str, str]:
    """relative path -> SHA-256 of every regular file under root."""
    out = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink():
                out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def write_config(directory: Path, data_dir: Path, repo_url: str, pg_dsn: str | None = None) -> Path:
    sections = {
        "node": {"name": "demo-node", "data_dir": str(data_dir), "quiesce": "offline",
                 "state_dir": str(directory / "state")},
        "repository": {"url": repo_url},
        "blobstores": {"external": "external", "subtreestore": "subtreestore", "blockstore": "blockstore"},
        "files": {"paths": ["p2p.key"]},
    }
    if pg_dsn:
        sections["postgres"] = {"dsn": pg_dsn}
    text = config_mod.render_toml(sections)
    path = directory / "drtool.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def run(directory: Path, *, seed: int = 1, tx_files: int = 3000, subtrees: int = 12, blocks: int = 10,
        postgres: bool = True) -> dict[str, Any]:
    """The demo; with PostgreSQL installed (and `postgres`), the sample chain also lives in a
    throwaway PostgreSQL cluster with Teranode's schema, backed up and restored with the rest."""
    from drtool import pgcluster

    reason = pgcluster.pg_available() if postgres else "--no-postgres"
    if reason:
        summary = _run(directory, None, seed=seed, tx_files=tx_files, subtrees=subtrees, blocks=blocks)
        summary["postgres"] = {"skipped": reason}
        return summary
    with pgcluster.start_cluster() as server:
        server.execute('CREATE DATABASE "teranode"')
        old = os.environ.get("PGPASSWORD")
        os.environ["PGPASSWORD"] = server.password  # never in the config file
        try:
            return _run(directory, server, seed=seed, tx_files=tx_files, subtrees=subtrees, blocks=blocks)
        finally:
            if old is None:
                os.environ.pop("PGPASSWORD", None)
            else:
                os.environ["PGPASSWORD"] = old


def _run(directory: Path, server, *, seed: int, tx_files: int, subtrees: int, blocks: int) -> dict[str, Any]:
    from drtool.sources import postgres
    from drtool.teranode import sample

    _prepare(directory)
    node_dir = directory / "node"
    t0 = time.monotonic()
    node = sample.build_sample_node(node_dir, seed=seed, tx_files=tx_files, subtrees=subtrees, blocks=blocks)
    pg_dsn = None
    if server is not None:
        pg_dsn = server.dsn_kv("teranode")
        postgres.load_sample_chain(pg_dsn, node.chain, subtrees=node.block_subtrees, persisted=list(node.block_files))
    built = time.monotonic() - t0
    cfg_path = write_config(directory, node_dir, f"file://{directory / 'repo'}", pg_dsn)
    cfg = config_mod.load(cfg_path)
    repo = open_repository(cfg.repository, create=True)
    summary: dict[str, Any] = {"ok": False, "directory": str(directory), "config": str(cfg_path),
                               "node": {"path": str(node_dir), "files": node.data_files, "bytes": node.data_bytes,
                                        "blocks": len(node.chain), "seconds": round(built, 2)},
                               "backups": []}

    first = snapshot.take(cfg, repo, tags=["demo"])
    summary["backups"].append(first.as_dict())
    sample.add_files(node_dir, seed=seed + 1, count=max(1, tx_files // 50))
    repo = open_repository(cfg.repository)
    second = snapshot.take(cfg, repo, tags=["demo", "incremental"])
    summary["backups"].append(second.as_dict())

    checked = verify.verify(repo, repo.snapshots(), read_fraction=1.0)
    summary["verify"] = {"ok": checked.ok, "findings": [f.as_dict() for f in checked.findings]}

    target = directory / "restored"
    t0 = time.monotonic()
    restored = restore_mod.restore(cfg, repo, second.manifest, target_dir=target,
                                   pg_dsn=server.dsn_kv("teranode_restored") if server else None)
    summary["restore"] = {**restored.as_dict(), "seconds": round(time.monotonic() - t0, 2), "path": str(target)}

    original = {p: h for p, h in tree_digest(node_dir).items()
                if not p.endswith(".tmp") and "/subtree_quorum/" not in f"/{p}"}
    summary["restore"]["identical"] = tree_digest(target) == original
    if server is not None:
        summary["postgres"] = {"best_block": second.manifest.doc.get("best_block"),
                               "restored_database": "teranode_restored",
                               "tables": second.manifest.sources["postgres"].get("row_counts")}
    summary["ok"] = checked.ok and restored.ok and summary["restore"]["identical"]
    return summary


def render(summary: dict[str, Any]) -> str:
    node = summary["node"]
    lines = [f"sample node: {node['files']} files, {_mib(node['bytes'])}, {node['blocks']} blocks in {node['path']}"]
    for label, b in zip(("first backup", "incremental"), summary["backups"]):
        s, snap = b["stats"], b["snapshot"]
        lines.append(f"{label}: snapshot {snap['id'][:8]}, {s['files_new']} files read, {s['files_unchanged']} "
                     f"unchanged, {_mib(s['bytes_read'])} read, {_mib(s['bytes_stored'])} stored, {s['seconds']:.1f}s")
    v = summary["verify"]
    lines.append(f"verify --read-data: {'ok' if v['ok'] else 'FAILED'} ({len(v['findings'])} findings)")
    r = summary["restore"]
    lines.append(f"restore: {r['files']} files, {_mib(r['bytes'])} into {r['path']} in {r['seconds']:.1f}s, "
                 f"{'byte-identical' if r['identical'] else 'DIFFERENT'}, Teranode checks "
                 f"{'passed' if not r['findings'] else 'FAILED'}")
    pg = summary.get("postgres", {})
    if "skipped" in pg:
        lines.append(f"postgres: not part of this demo ({pg['skipped']})")
    elif pg:
        best = pg["best_block"] or {}
        lines.append(f"postgres: Teranode's schema with {pg['tables'].get('blocks', 0)} blocks (best block "
                     f"{best.get('height')} {str(best.get('hash'))[:16]}…) dumped, restored into a fresh database, "
                     "chain and cross-store checks passed (a throwaway cluster, removed again)")
    lines.append(f"demo {'passed' if summary['ok'] else 'FAILED'}; config: {summary['config']}")
    exe = sys.argv[0] if Path(sys.argv[0]).name == "drtool" else "drtool"
    lines.append(f"try: {exe} -c {summary['config']} snapshots")
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"
