"""`drtool demo`: the README's first command, end to end, as a child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from drtool.pgcluster import pg_available

REPO = Path(__file__).resolve().parents[1]


def run_demo(directory: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "drtool.cli", "--json", "demo", str(directory), "--tx-files", "300",
                           "--subtrees", "3", "--blocks", "5", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_demo_end_to_end(tmp_path):
    proc = run_demo(tmp_path / "demo")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["ok"] and summary["restore"]["identical"] and summary["verify"]["ok"]
    first, second = summary["backups"]
    assert first["stats"]["files_new"] == summary["node"]["files"]
    assert second["stats"]["files_unchanged"] == summary["node"]["files"]
    if pg_available() is None:
        assert summary["postgres"]["tables"]["blocks"] == 5
    else:
        assert "skipped" in summary["postgres"]
    # Same seed, same bytes: a second demo reuses the folder and builds the identical node.
    again = run_demo(tmp_path / "demo")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["node"] == {**summary["node"], "seconds": json.loads(again.stdout)["node"]["seconds"]}


def test_demo_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep")
    proc = run_demo(tmp_path / "mine")
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep"
