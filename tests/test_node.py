"""Quiesce / resume of a Teranode node (drtool.node) against real child processes.

tests/data/fake_teranode/ holds executables standing in for `teranode-cli` and `docker compose`:
they keep the FSM state and the services' state in files and log every call, so the order of
operations and the node's final state are read back from what the commands really saw.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

from drtool.config import NodeConfig
from drtool.errors import ConfigError, DrtoolError
from drtool.node import (
    NodeCommandError,
    NodeControl,
    QuiesceExpired,
    QuiesceInterrupted,
    format_duration,
    make_node_control,
    parse_fsm_state,
)

REPO = Path(__file__).resolve().parents[1]
FAKES = REPO / "tests" / "data" / "fake_teranode"
SERVICES = ["blockchain", "asset", "rpc"]


class FakeNode:
    """The fake node's files, and NodeControls driving it."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "node"
        self.dir.mkdir()
        self.state_dir = root / "drtool-state"
        self.cli = [str(FAKES / "teranode-cli")]
        self.stop = [str(FAKES / "compose"), "stop", *SERVICES]
        self.start = [str(FAKES / "compose"), "start", *SERVICES]

    def control(self, **kw) -> NodeControl:
        args = dict(max_quiesce=timedelta(minutes=5), catchingblocks_wait=timedelta(seconds=5),
                    command_timeout=timedelta(seconds=20), poll_interval=0.02,
                    ready_wait=timedelta(seconds=5), resume_grace=timedelta(seconds=5))
        args.update(kw)
        return NodeControl(self.cli, self.stop, self.start, self.state_dir, **args)

    def knob(self, name: str, value: str) -> None:
        (self.dir / name).write_text(value + "\n")

    def read(self, name: str, default: str = "") -> str:
        path = self.dir / name
        return path.read_text().strip() if path.exists() else default

    @property
    def fsm(self) -> str:
        return self.read("fsm_state", "RUNNING")

    @property
    def services(self) -> str:
        return self.read("services", "running")

    def mark(self, text: str) -> None:
        with open(self.dir / "log", "a") as f:
            f.write(text + "\n")

    def log(self) -> list[str]:
        return self.read("log").splitlines()

    def actions(self) -> list[str]:
        """The log without the read-only getfsmstate polls."""
        return [line for line in self.log() if "getfsmstate" not in line]

    @property
    def record(self) -> Path:
        return self.state_dir / "quiesce.json"


@pytest.fixture
def node(tmp_path, monkeypatch) -> FakeNode:
    fake = FakeNode(tmp_path)
    monkeypatch.setenv("FAKE_TERANODE_DIR", str(fake.dir))
    return fake


STOP = "compose stop " + " ".join(SERVICES)
START = "compose start " + " ".join(SERVICES)
RUNNING_CYCLE = ["teranode-cli setfsmstate idle -> IDLE", STOP, "body", START,
                 "teranode-cli setfsmstate running -> RUNNING"]


def test_running_node_order_idle_stop_body_start_running(node):
    previous_sigterm = signal.getsignal(signal.SIGTERM)
    nc = node.control()
    with nc.quiesce() as q:
        node.mark("body")
        assert q.previous_state == "RUNNING"
        assert (node.fsm, node.services) == ("IDLE", "stopped")
        record = json.loads(node.record.read_text())
        assert record["previous_fsm_state"] == "RUNNING"
        assert record["pid"] == os.getpid()
        assert record["services_stopped"] == node.stop
        assert record["host"] and record["started_at"]
        assert signal.getsignal(signal.SIGTERM) is not previous_sigterm
    assert node.actions() == RUNNING_CYCLE
    assert (node.fsm, node.services) == ("RUNNING", "running")
    assert not node.record.exists()
    assert signal.getsignal(signal.SIGTERM) is previous_sigterm


def test_idle_node_stays_idle(node):
    node.knob("fsm_state", "IDLE")
    with node.control().quiesce() as q:
        node.mark("body")
        assert q.previous_state == "IDLE"
    assert node.actions() == [STOP, "body", START]  # no setfsmstate either way
    assert (node.fsm, node.services) == ("IDLE", "running")
    assert not node.record.exists()


def test_legacysyncing_node_is_set_back_to_legacysyncing(node):
    node.knob("fsm_state", "LEGACYSYNCING")
    with node.control().quiesce() as q:
        node.mark("body")
        assert q.previous_state == "LEGACYSYNCING" and node.fsm == "IDLE"
    assert node.actions() == ["teranode-cli setfsmstate idle -> IDLE", STOP, "body", START,
                              "teranode-cli setfsmstate legacysyncing -> LEGACYSYNCING"]
    assert node.fsm == "LEGACYSYNCING"


def test_node_catching_up_after_restart_is_left_alone(node):
    node.knob("state_after_start", "CATCHINGBLOCKS")
    with node.control().quiesce():
        node.mark("body")
    assert node.actions() == RUNNING_CYCLE[:-1]  # no RUN forced on a node catching up
    assert node.fsm == "CATCHINGBLOCKS"
    assert not node.record.exists()


def test_exception_in_body_resumes_and_propagates(node):
    boom = RuntimeError("source failed")
    with pytest.raises(RuntimeError) as caught:
        with node.control().quiesce():
            node.mark("body")
            raise boom
    assert caught.value is boom
    assert node.actions() == RUNNING_CYCLE
    assert (node.fsm, node.services) == ("RUNNING", "running")
    assert not node.record.exists()


def test_keyboard_interrupt_in_body_resumes(node):
    with pytest.raises(KeyboardInterrupt):
        with node.control().quiesce():
            node.mark("body")
            raise KeyboardInterrupt
    assert node.actions() == RUNNING_CYCLE
    assert not node.record.exists()


def test_catchingblocks_that_never_ends_leaves_node_untouched(node):
    node.knob("fsm_state", "CATCHINGBLOCKS")
    node.knob("catching_polls", "never")
    ran = []
    with pytest.raises(NodeCommandError, match=r"stayed CATCHINGBLOCKS for 0\.3s .*node left untouched"):
        with node.control(catchingblocks_wait=timedelta(seconds=0.3)).quiesce():
            ran.append(1)
    assert not ran
    assert node.actions() == []  # polls only: no setfsmstate, no stop
    assert len(node.log()) >= 3
    assert (node.fsm, node.services) == ("CATCHINGBLOCKS", "running")
    assert not node.record.exists()


def test_catchingblocks_that_reaches_running_proceeds(node):
    node.knob("fsm_state", "CATCHINGBLOCKS")
    node.knob("catching_polls", "3")
    with node.control().quiesce() as q:
        node.mark("body")
        assert q.previous_state == "RUNNING"
    log = node.log()
    assert log[:3] == ["teranode-cli getfsmstate -> CATCHINGBLOCKS"] * 2 + ["teranode-cli getfsmstate -> RUNNING"]
    assert node.actions() == RUNNING_CYCLE
    assert (node.fsm, node.services) == ("RUNNING", "running")


def test_failing_stop_resumes_node_with_clear_error(node):
    node.knob("fail_next", "stop")
    ran = []
    with pytest.raises(NodeCommandError) as caught:
        with node.control().quiesce():
            ran.append(1)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("stopping the Teranode services: ")
    assert "compose stop blockchain" in message and "exited with status 3: fake failure of stop" in message
    assert message.endswith("; node resumed")
    assert not ran
    assert node.actions() == ["teranode-cli setfsmstate idle -> IDLE", STOP + " -> fail", START,
                              "teranode-cli setfsmstate running -> RUNNING"]
    assert (node.fsm, node.services) == ("RUNNING", "running")
    assert not node.record.exists()


def test_hanging_stop_times_out_and_resumes(node):
    node.knob("hang_next", "stop")
    t0 = time.monotonic()
    with pytest.raises(NodeCommandError, match=r"compose stop .* timed out after 1s; node resumed"):
        with node.control(command_timeout=timedelta(seconds=1)).quiesce():
            pass
    assert time.monotonic() - t0 < 10
    assert node.actions()[-2:] == [START, "teranode-cli setfsmstate running -> RUNNING"]
    assert (node.fsm, node.services) == ("RUNNING", "running")


def test_error_output_is_redacted(node):
    node.knob("fail_next", "stop postgresql://teranode:hunter2@db:5432/teranode")
    with pytest.raises(NodeCommandError) as caught:
        with node.control().quiesce():
            pass
    assert "hunter2" not in str(caught.value)
    assert "teranode:****@db" in str(caught.value)


def test_resume_waits_for_blockchain_service_after_start(node):
    with node.control().quiesce():
        node.mark("body")
        node.knob("unready_calls", "2")  # the first calls after start find the service starting
    assert node.log()[-5:] == [START, "teranode-cli getfsmstate -> unready", "teranode-cli getfsmstate -> unready",
                               "teranode-cli getfsmstate -> IDLE", "teranode-cli setfsmstate running -> RUNNING"]
    assert node.fsm == "RUNNING"


def test_failed_resume_keeps_record_and_next_run_recovers(node):
    nc = node.control(ready_wait=timedelta(seconds=0.3))
    node.knob("fail_next", "start")
    with pytest.raises(NodeCommandError, match=r"resuming the node failed: starting the Teranode services: .*"
                                               r"quiesce\.json is kept"):
        with nc.quiesce():
            node.mark("body")
    record = json.loads(node.record.read_text())
    assert record["resume_failed"] is True and record["previous_fsm_state"] == "RUNNING"
    assert (node.fsm, node.services) == ("IDLE", "stopped")
    # the same process (the daemon) or a later run retries, although the owner pid is alive
    message = nc.recover_leftover_quiesce()
    assert message and "whose resume failed" in message
    assert (node.fsm, node.services) == ("RUNNING", "running")
    assert not node.record.exists()
    assert nc.recover_leftover_quiesce() is None


def test_max_quiesce_interrupts_main_thread_body(node):
    previous_sigterm = signal.getsignal(signal.SIGTERM)
    nc = node.control(max_quiesce=timedelta(seconds=1))
    t0 = time.monotonic()
    with pytest.raises(QuiesceExpired, match=r"^quiesce exceeded max_quiesce \(1s\): node resumed$"):
        with nc.quiesce():
            node.mark("body")
            time.sleep(30)  # a blocking call: the watchdog's signal breaks it
    assert time.monotonic() - t0 < 10
    assert node.actions() == RUNNING_CYCLE
    assert (node.fsm, node.services) == ("RUNNING", "running")
    assert not node.record.exists()
    assert signal.getsignal(signal.SIGTERM) is previous_sigterm


def _in_thread(fn):
    result: dict = {}

    def run():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            result["exc"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def test_max_quiesce_in_worker_thread_with_cooperative_body(node):
    nc = node.control(max_quiesce=timedelta(seconds=0.5))

    def backup():
        with nc.quiesce() as q:
            node.mark("body")
            for _ in range(600):
                q.check()
                time.sleep(0.05)

    thread, result = _in_thread(backup)
    thread.join(30)
    assert not thread.is_alive()
    assert isinstance(result.get("exc"), QuiesceExpired)
    assert str(result["exc"]) == "quiesce exceeded max_quiesce (0.5s): node resumed"
    assert node.actions() == RUNNING_CYCLE
    assert not node.record.exists()


def test_watchdog_resumes_node_while_a_stuck_body_still_runs(node):
    nc = node.control(max_quiesce=timedelta(seconds=0.5), resume_grace=timedelta(0))
    body_done = threading.Event()

    def backup():
        with nc.quiesce():
            node.mark("body")
            time.sleep(4)  # ignores the quiesce: cannot be interrupted outside the main thread
            body_done.set()

    thread, result = _in_thread(backup)
    deadline = time.monotonic() + 3.5
    while time.monotonic() < deadline and node.fsm != "RUNNING":
        time.sleep(0.05)
    assert not body_done.is_set()
    assert (node.fsm, node.services) == ("RUNNING", "running")  # resumed before the body ended
    thread.join(30)
    assert isinstance(result.get("exc"), QuiesceExpired)
    assert node.actions() == RUNNING_CYCLE  # resumed exactly once
    assert not node.record.exists()


CHILD = r"""
import json, os, sys, time
from datetime import timedelta
from pathlib import Path
from drtool.node import NodeControl
cfg = json.loads(sys.argv[1])
node = NodeControl(cfg["cli"], cfg["stop"], cfg["start"], Path(cfg["state_dir"]), timedelta(minutes=5),
                   poll_interval=0.02)
fake = Path(os.environ["FAKE_TERANODE_DIR"])
with node.quiesce():
    with open(fake / "log", "a") as f:
        f.write("body\n")
    (fake / "ready").touch()
    time.sleep(60)
"""


def _spawn_quiescing_child(node: FakeNode, ready: str = "ready") -> subprocess.Popen:
    cfg = {"cli": node.cli, "stop": node.stop, "start": node.start, "state_dir": str(node.state_dir)}
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(cfg)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not _ready(node, ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"quiescing child did not get ready: rc={proc.returncode} {err}")
        time.sleep(0.02)
    return proc


def _ready(node: FakeNode, ready: str) -> bool:
    if ready == "ready":
        return (node.dir / "ready").exists()
    return any(ready in line for line in node.log())


def test_sigterm_to_drtool_resumes_node(node):
    proc = _spawn_quiescing_child(node)
    try:
        # while it runs: its record is live, so nobody else undoes or repeats the quiesce
        other = node.control()
        assert other.recover_leftover_quiesce() is None
        with pytest.raises(DrtoolError, match=rf"already quiesced by pid {proc.pid}"):
            with other.quiesce():
                pass
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 1
    assert "QuiesceInterrupted: drtool received SIGTERM during the quiesce: node resumed" in err
    assert node.actions() == RUNNING_CYCLE
    assert (node.fsm, node.services) == ("RUNNING", "running")
    assert not node.record.exists()


def test_sigterm_during_hanging_stop_kills_it_and_resumes(node):
    node.knob("hang_next", "stop")
    proc = _spawn_quiescing_child(node, ready="-> hang")
    try:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 1
    assert "received SIGTERM" in err and "node resumed" in err
    assert node.actions() == ["teranode-cli setfsmstate idle -> IDLE", STOP + " -> hang", START,
                              "teranode-cli setfsmstate running -> RUNNING"]
    assert (node.fsm, node.services) == ("RUNNING", "running")
    assert not node.record.exists()


def test_ctrl_c_to_drtool_resumes_node(node):
    proc = _spawn_quiescing_child(node)
    try:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode in (-signal.SIGINT, 130, 1)
    assert node.actions() == RUNNING_CYCLE
    assert not node.record.exists()


def test_kill_9_then_recover_leftover_quiesce(node, caplog):
    proc = _spawn_quiescing_child(node)
    proc.kill()  # SIGKILL: no handler runs
    proc.communicate(timeout=30)
    assert (node.fsm, node.services) == ("IDLE", "stopped")
    assert json.loads(node.record.read_text())["pid"] == proc.pid
    with caplog.at_level("WARNING", logger="drtool.node"):
        message = node.control().recover_leftover_quiesce()
    assert message and f"pid {proc.pid}" in message and "dead drtool" in message
    assert message in caplog.text
    assert node.actions() == RUNNING_CYCLE
    assert (node.fsm, node.services) == ("RUNNING", "running")
    assert not node.record.exists()
    assert node.control().recover_leftover_quiesce() is None


def test_quiesce_undoes_a_leftover_before_starting(node):
    proc = _spawn_quiescing_child(node)
    proc.kill()
    proc.communicate(timeout=30)
    with node.control().quiesce():
        node.mark("body2")
    assert node.actions() == RUNNING_CYCLE + [
        "teranode-cli setfsmstate idle -> IDLE", STOP, "body2", START, "teranode-cli setfsmstate running -> RUNNING"]
    assert not node.record.exists()


def test_modes_none_and_offline_touch_nothing(node, tmp_path):
    for mode in ("none", "offline"):
        nc = NodeControl(["/nonexistent/teranode-cli"], [], [], tmp_path / mode, timedelta(minutes=30), mode=mode)
        with nc.quiesce() as q:
            q.check()
            assert q.previous_state is None and q.mode == mode
        assert not (tmp_path / mode).exists()
    assert node.log() == []


def test_make_node_control_from_config(node, tmp_path):
    cfg = NodeConfig(name="n", data_dir=tmp_path, quiesce="stop", teranode_cli=node.cli, stop_command=node.stop,
                     start_command=node.start, max_quiesce="30m", state_dir=node.state_dir)
    nc = make_node_control(cfg, poll_interval=0.02)
    assert nc.max_quiesce == timedelta(minutes=30) and nc.mode == "stop"
    assert nc.get_fsm_state() == "RUNNING"
    cfg.stop_command = []
    with pytest.raises(ConfigError, match=r"\[node\] stop_command: required when quiesce = \"stop\""):
        make_node_control(cfg)


def test_set_fsm_state_refused_by_node_is_a_clear_error(node):
    nc = node.control()
    node.knob("fsm_state", "CATCHINGBLOCKS")
    with pytest.raises(NodeCommandError, match=r"setting the FSM state to idle: .*setfsmstate --fsmstate idle "
                                               r"exited with status 1: .*inappropriate in current state"):
        nc.set_fsm_state("idle")
    with pytest.raises(ValueError):
        nc.set_fsm_state("bogus")


def test_missing_cli_is_a_clear_error(node, tmp_path):
    nc = NodeControl([str(tmp_path / "no-such-cli")], node.stop, node.start, node.state_dir, timedelta(minutes=1))
    with pytest.raises(NodeCommandError, match=r"^reading the FSM state: cannot run .*no-such-cli"):
        with nc.quiesce():
            pass
    assert node.log() == []


@pytest.mark.parametrize("output, state", [
    ("2025-01-01 | INFO | teranode-cli | connecting\nCurrent state: RUNNING\n", "RUNNING"),
    ("Current state: CATCHINGBLOCKS", "CATCHINGBLOCKS"),
    ("Current FSM state: RUNNING , target FSM state: idle , sending event: IDLE\nFSM state set to: IDLE\n", "IDLE"),
    ('{"state": "LEGACYSYNCING", "state_value": 3}', "LEGACYSYNCING"),
    ("idle\n", "IDLE"),
    ("current state: Stopped", "STOPPED"),
])
def test_parse_fsm_state_variants(output, state):
    assert parse_fsm_state(output) == state


@pytest.mark.parametrize("output", ["", "connection refused", "Error: invalid fsm state"])
def test_parse_fsm_state_rejects_garbage(output):
    with pytest.raises(ValueError, match="no FSM state"):
        parse_fsm_state(output)


def test_format_duration():
    assert [format_duration(timedelta(minutes=30)), format_duration(7200), format_duration(1.5),
            format_duration(45)] == ["30m", "2h", "1.5s", "45s"]
