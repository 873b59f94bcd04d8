"""Fixtures for whole-command tests: a configured sample node and a way to run drtool."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from drtool import config as config_mod


@dataclass
class Node:
    """A sample node with a drtool.toml pointing at a repository."""

    dir: Path
    data_dir: Path
    config: Path
    repo_url: str
    env: dict[str, str]

    def run(self, *args: str, check: int | None = 0, timeout: float = 300, json_out: bool = False):
        """Run `drtool --config <cfg> args...` as a child process; returns CompletedProcess
        (with .doc = the parsed JSON when json_out)."""
        argv = [sys.executable, "-m", "drtool.cli", "--config", str(self.config)]
        if json_out:
            argv.append("--json")
        proc = subprocess.run(argv + list(args), capture_output=True, text=True, env=self.env, timeout=timeout)
        if check is not None and proc.returncode != check:
            raise AssertionError(f"drtool {' '.join(args)} exited {proc.returncode} (wanted {check})\n"
                                 f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
        proc.doc = json.loads(proc.stdout) if json_out and proc.stdout.strip() else None
        return proc


def write_node_config(path: Path, data_dir: Path, repo_url: str, *, endpoint_url: str = "",
                      extra: dict | None = None) -> Path:
    sections = {
        "node": {"name": "test-node", "data_dir": str(data_dir), "quiesce": "offline",
                 "state_dir": str(path.parent / "state")},
        "repository": {"url": repo_url, **({"endpoint_url": endpoint_url} if endpoint_url else {})},
        "blobstores": {"external": "external", "subtreestore": "subtreestore", "blockstore": "blockstore"},
        "files": {"paths": ["p2p.key"]},
    }
    for section, values in (extra or {}).items():
        sections.setdefault(section, {}).update(values)
    path.write_text(config_mod.render_toml(sections))
    return path


@pytest.fixture(params=["local", "s3"])
def node(request, tmp_path) -> Node:
    """A small sample node configured against a local-folder or an S3 (moto_server) repository."""
    from drtool.teranode import sample

    data_dir = tmp_path / "node"
    sample.build_sample_node(data_dir, seed=7, tx_files=300, subtrees=4, blocks=5,
                             subtree_size_range=(100 * 1024, 3 * 1024 * 1024))
    if request.param == "s3":
        endpoint, bucket = request.getfixturevalue("s3_bucket")  # also sets the AWS_* test credentials
        repo_url, endpoint_url = f"s3://{bucket}/node-1", endpoint
    else:
        repo_url, endpoint_url = f"file://{tmp_path / 'repo'}", ""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    cfg = write_node_config(tmp_path / "drtool.toml", data_dir, repo_url, endpoint_url=endpoint_url)
    return Node(tmp_path, data_dir, cfg, repo_url, env)


@pytest.fixture
def local_node(tmp_path) -> Node:
    """The same node, local repository only (for tests that damage repository files)."""
    from drtool.teranode import sample

    data_dir = tmp_path / "node"
    sample.build_sample_node(data_dir, seed=7, tx_files=300, subtrees=4, blocks=5,
                             subtree_size_range=(100 * 1024, 3 * 1024 * 1024))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    repo_url = f"file://{tmp_path / 'repo'}"
    cfg = write_node_config(tmp_path / "drtool.toml", data_dir, repo_url)
    return Node(tmp_path, data_dir, cfg, repo_url, env)
