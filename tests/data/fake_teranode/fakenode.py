"""Shared state of the fake Teranode node used by tests/test_node.py.

A stand-in for `docker exec blockchain teranode-cli` and `docker compose`: real child processes
that keep the node's state in files of $FAKE_TERANODE_DIR and append every call to its `log`.

Files in $FAKE_TERANODE_DIR:
  fsm_state        the blockchain FSM state (RUNNING if absent), persisted like Teranode's
  services         "running" | "stopped" | "partial" (running if absent)
  log              one line per call: "<tool> <args...> [-> result]"
Knobs (files the test writes):
  fail_next        "<command> [message]": the next call of that command ("getfsmstate",
                   "setfsmstate", "stop", "start" or "*" for any) fails once, printing message
  hang_next        "<command>": the next call of that command sleeps for an hour (one-shot)
  catching_polls   while the state is CATCHINGBLOCKS, each getfsmstate counts it down; at 0 the
                   node reaches RUNNING. "never": it stays CATCHINGBLOCKS
  unready_calls    N: the next N teranode-cli calls fail as if the blockchain service were still
                   starting (set by the test, e.g. to exercise the retry after `start`)
  state_after_start  the FSM state the node takes by itself when its services start
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

DIR = Path(os.environ["FAKE_TERANODE_DIR"])

# Teranode's FSM (services/blockchain/fsm.go): event name -> (allowed sources, destination)
TRANSITIONS = {
    "idle": ({"RUNNING", "LEGACYSYNCING"}, "IDLE"),  # no STOP from CATCHINGBLOCKS
    "running": ({"IDLE", "LEGACYSYNCING", "CATCHINGBLOCKS"}, "RUNNING"),
    "catchingblocks": ({"IDLE", "RUNNING"}, "CATCHINGBLOCKS"),
    "legacysyncing": ({"IDLE"}, "LEGACYSYNCING"),
}
EVENT_NAMES = {"idle": "IDLE", "running": "RUN", "catchingblocks": "CATCHUPBLOCKS", "legacysyncing": "LEGACYSYNC"}


def read(name: str, default: str = "") -> str:
    path = DIR / name
    return path.read_text().strip() if path.exists() else default


def write(name: str, value: str) -> None:
    tmp = DIR / f".{name}.tmp"
    tmp.write_text(value + "\n")
    os.replace(tmp, DIR / name)


def log(line: str) -> None:
    with open(DIR / "log", "a") as f:
        f.write(line + "\n")


def _take_knob(name: str, command: str) -> str | None:
    """Consume a one-shot knob aimed at `command`; return its message (or "")."""
    value = read(name)
    if not value:
        return None
    target, _, message = value.partition(" ")
    if target not in (command, "*"):
        return None
    (DIR / name).unlink()
    return message


def apply_knobs(tool: str, command: str, args: list[str]) -> None:
    """Hang or fail as the test asked, logging the call either way."""
    if _take_knob("hang_next", command) is not None:
        log(f"{tool} {' '.join(args)} -> hang")
        time.sleep(3600)
    message = _take_knob("fail_next", command)
    if message is not None:
        log(f"{tool} {' '.join(args)} -> fail")
        if command == "stop":  # a stop that fails half-way leaves some services stopped
            write("services", "partial")
        print(f"fake failure of {command}: {message or 'injected'}", file=sys.stderr)
        sys.exit(3)
