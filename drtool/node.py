"""Quiescing a Teranode node around a snapshot, and always resuming it.

Automates Teranode's own backup runbook (shared/teranode.md, "Consistency"):
  1. read the FSM state (`teranode-cli getfsmstate`); from CATCHINGBLOCKS no STOP is allowed, so
     wait for RUNNING up to `catchingblocks_wait`, else give up leaving the node untouched;
  2. write the quiesce record `state_dir/quiesce.json` (so a later run can undo a kill -9);
  3. RUNNING / LEGACYSYNCING -> `setfsmstate --fsmstate idle` (persisted: the node restarts idle);
  4. stop the Teranode services (`stop_command`; the databases keep running);
  5. the caller takes the snapshot (the body of `with node.quiesce():`);
  6. start the services (`start_command`), set the FSM back to what it was, delete the record.
Step 6 runs whatever happens: an exception in the body, Ctrl-C, SIGTERM, a failing stop command,
`max_quiesce` exceeded. After a kill -9, `recover_leftover_quiesce()` (called at the start of every
run and by the daemon) finds the record of a dead owner and does step 6 then.

How a quiesce longer than `max_quiesce` is interrupted: a watchdog thread marks the quiesce as
expired (`handle.expired`, `handle.check()` raises QuiesceExpired) and,
  - when the quiesce runs in the main thread, sends SIGTERM to that thread (pthread_kill): our
    handler raises QuiesceExpired there, which also breaks out of blocking reads and waits;
  - in any other thread (no signal handlers can be installed there), the body must poll
    `handle.check()` between units of work.
Either way, if the owner has not resumed the node `resume_grace` after expiry (a body stuck in a
call that cannot be interrupted), the watchdog resumes it itself: the node is never held longer
than max_quiesce + resume_grace, and the backup fails with "quiesce exceeded max_quiesce (30m):
node resumed".

The best block (height, hash) is not read here: teranode-cli has no command printing it (its
commands: getfsmstate, setfsmstate, settings, seeder, ...), so the PostgreSQL source reads it
from the `blocks` table.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from drtool import secrets
from drtool.errors import ConfigError, DrtoolError

log = logging.getLogger(__name__)

RECORD_NAME = "quiesce.json"

# FSM states of teranode's blockchain_api.FSMStateType; STOPPED, CATCHINGTXS and RESTORING are the
# names of releases before 2025 (STOPPED then meant what IDLE means now).
KNOWN_STATES = frozenset({"IDLE", "RUNNING", "CATCHINGBLOCKS", "LEGACYSYNCING", "STOPPED", "CATCHINGTXS", "RESTORING"})
IDLE_STATES = frozenset({"IDLE", "STOPPED"})
STOPPABLE_STATES = frozenset({"RUNNING", "LEGACYSYNCING"})  # the states `setfsmstate idle` leaves
SETTABLE_STATES = ("idle", "running", "catchingblocks", "legacysyncing")  # setfsmstate --fsmstate

# "Current state: RUNNING" (getfsmstate), "FSM state set to: IDLE" (setfsmstate)
_STATE_LINE = re.compile(r"(?:current(?:\s+fsm)?\s+state|fsm\s+state\s+set\s+to)\s*:\s*\"?([A-Za-z_]+)", re.IGNORECASE)


class NodeCommandError(DrtoolError):
    """teranode-cli or a service command failed, or its output made no sense."""


class QuiesceExpired(DrtoolError):
    """The quiesce lasted longer than max_quiesce; the node was (or is being) resumed."""


class QuiesceInterrupted(DrtoolError):
    """drtool received SIGTERM while the node was quiesced; the node was resumed."""


def parse_fsm_state(output: str) -> str:
    """The FSM state in the output of `teranode-cli getfsmstate` (or setfsmstate, or the asset API).

    Accepts "Current state: RUNNING" among log lines (Teranode's format), "FSM state set to: IDLE"
    (the last such line wins), the asset service's JSON {"state": "RUNNING", ...}, or a bare state.
    """
    text = output.strip()
    if text.startswith("{"):
        try:
            state = json.loads(text).get("state")
        except (ValueError, AttributeError):
            state = None
        if isinstance(state, str) and state:
            return state.upper()
    found = _STATE_LINE.findall(output)
    if found:
        return found[-1].upper()
    for line in reversed(text.splitlines()):
        word = line.strip().strip('"').upper()
        if word in KNOWN_STATES:
            return word
    raise ValueError(f"no FSM state in the output: {_one_line(output) or '(empty)'}")


def format_duration(value: timedelta | float) -> str:
    """30m, 2h, 45s, 1.5s: how durations are written in drtool.toml."""
    seconds = _seconds(value)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def parse_duration(text: str) -> timedelta:
    """'30m', '6h', '45s', '1d', or plain seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise ValueError(f"expected a duration like 30s, 30m, 6h or 1d, got {text!r}")
    size = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return timedelta(seconds=float(match.group(1)) * size)


def _seconds(value: timedelta | float) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def _one_line(text: str, limit: int = 300) -> str:
    """The last few non-empty lines of a command's output, on one line, redacted."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    joined = " | ".join(lines[-3:])
    if len(joined) > limit:
        joined = "..." + joined[-limit:]
    return secrets.redact(joined)


def _process_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/PID/stat): tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def _pid_alive(pid: int, start_time: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if start_time is not None:
        current = _process_start_time(pid)
        if current is not None and current != start_time:
            return False  # the pid was reused by another process (e.g. after a reboot)
    return True


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill a command we started and everything it spawned (it leads its own session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


class NodeControl:
    """Reads and drives one node's FSM and services through configured commands (argv lists)."""

    def __init__(
        self,
        teranode_cli: list[str],
        stop_command: list[str],
        start_command: list[str],
        state_dir: Path,
        max_quiesce: timedelta,
        catchingblocks_wait: timedelta = timedelta(minutes=10),
        command_timeout: timedelta = timedelta(minutes=5),
        *,
        mode: str = "stop",
        poll_interval: float = 5.0,
        ready_wait: timedelta = timedelta(minutes=2),
        resume_grace: timedelta = timedelta(seconds=60),
    ) -> None:
        if mode not in ("stop", "none", "offline"):
            raise ConfigError(f"[node] quiesce: expected one of stop, none, offline, got {mode!r}")
        if mode == "stop":
            for key, value in (("teranode_cli", teranode_cli), ("stop_command", stop_command),
                               ("start_command", start_command)):
                if not value:
                    raise ConfigError(f'[node] {key}: required when quiesce = "stop"')
        self.mode = mode
        self.teranode_cli = list(teranode_cli)
        self.stop_command = list(stop_command)
        self.start_command = list(start_command)
        self.state_dir = Path(state_dir)
        self.max_quiesce = timedelta(seconds=_seconds(max_quiesce))
        self.catchingblocks_wait = _seconds(catchingblocks_wait)
        self.command_timeout = _seconds(command_timeout)
        self.poll_interval = poll_interval  # between getfsmstate polls (tests use a few ms)
        self.ready_wait = _seconds(ready_wait)  # for the blockchain service to answer after start
        self.resume_grace = _seconds(resume_grace)

    @property
    def record_path(self) -> Path:
        return self.state_dir / RECORD_NAME

    # -- commands ---------------------------------------------------------------------------

    def _run(self, argv: list[str], what: str) -> str:
        """Run one command (no shell) with the command timeout; its stdout, or a one-line error."""
        shown = secrets.redact(shlex.join(argv))
        try:
            # Own session: a Ctrl-C at the terminal reaches drtool only, which then decides what
            # to stop, and a timeout kills the command's children too.
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True)
        except OSError as exc:
            raise NodeCommandError(f"{what}: cannot run {shown}: {exc.strerror or exc}") from None
        try:
            out, err = proc.communicate(timeout=self.command_timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise NodeCommandError(f"{what}: {shown} timed out after {format_duration(self.command_timeout)}") from None
        except BaseException:  # interrupted (SIGTERM, Ctrl-C, max_quiesce): don't leave it running
            _kill_group(proc)
            raise
        if proc.returncode != 0:
            detail = _one_line(err) or _one_line(out) or "no output"
            raise NodeCommandError(f"{what}: {shown} exited with status {proc.returncode}: {detail}")
        return out

    def get_fsm_state(self) -> str:
        """The node's FSM state, e.g. RUNNING, IDLE, CATCHINGBLOCKS, LEGACYSYNCING."""
        argv = self.teranode_cli + ["getfsmstate"]
        out = self._run(argv, "reading the FSM state")
        try:
            return parse_fsm_state(out)
        except ValueError as exc:
            raise NodeCommandError(f"reading the FSM state: {secrets.redact(shlex.join(argv))}: {exc}") from None

    def set_fsm_state(self, state: str) -> str:
        """`setfsmstate --fsmstate STATE`; returns the state the node reports afterwards."""
        target = state.lower()
        if target not in SETTABLE_STATES:
            raise ValueError(f"FSM state {state!r}: expected one of {', '.join(SETTABLE_STATES)}")
        out = self._run(self.teranode_cli + ["setfsmstate", "--fsmstate", target], f"setting the FSM state to {target}")
        try:
            now = parse_fsm_state(out)
        except ValueError:
            now = self.get_fsm_state()
        wanted = {target.upper()}
        if target == "idle":
            wanted = IDLE_STATES
        elif target == "running":
            wanted = {"RUNNING", "CATCHINGBLOCKS"}  # a node behind its peers catches up first
        if now not in wanted:
            raise NodeCommandError(f"setting the FSM state to {target}: the node reports {now} afterwards")
        return now

    # -- the quiesce record -----------------------------------------------------------------

    def _read_record(self) -> dict[str, Any] | None:
        try:
            text = self.record_path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise DrtoolError(f"{self.record_path}: cannot read the quiesce record: {exc.strerror}") from None
        try:
            record = json.loads(text)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            raise DrtoolError(f"{self.record_path}: unreadable quiesce record ({exc}): check the node's "
                              "services and FSM state, then delete the file") from None
        return record

    def _write_record(self, record: dict[str, Any]) -> None:
        """Atomically (write, fsync, rename): a kill -9 leaves the old record or the new one."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.record_path.with_name(f".{RECORD_NAME}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.record_path)

    def _delete_record(self) -> None:
        self.record_path.unlink(missing_ok=True)

    def _new_record(self, previous_state: str) -> dict[str, Any]:
        return {
            "version": 1,
            "previous_fsm_state": previous_state,
            "services_stopped": self.stop_command,
            "start_command": self.start_command,
            "teranode_cli": self.teranode_cli,
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "pid": os.getpid(),
            "pid_start_time": _process_start_time(os.getpid()),
            "host": socket.gethostname(),
            "max_quiesce_s": self.max_quiesce.total_seconds(),
            "resume_failed": False,
        }

    # -- quiesce / resume -------------------------------------------------------------------

    def quiesce(self) -> "Quiesce | NoQuiesce":
        """Context manager: the node quiesced inside, resumed after (see the module docstring).

        Yields a handle: `.previous_state`, `.expired` (threading.Event), `.check()`.
        Modes "none" (hot snapshot) and "offline" (node not running) touch nothing.
        """
        if self.mode != "stop":
            return NoQuiesce(self.mode)
        return Quiesce(self)

    def _settled_state(self) -> str:
        """The FSM state to quiesce from, waiting out CATCHINGBLOCKS (nothing changed yet)."""
        state = self.get_fsm_state()
        deadline = time.monotonic() + self.catchingblocks_wait
        if state == "CATCHINGBLOCKS":
            log.info("node is CATCHINGBLOCKS: waiting up to %s for RUNNING", format_duration(self.catchingblocks_wait))
        while state == "CATCHINGBLOCKS":
            if time.monotonic() >= deadline:
                raise NodeCommandError(
                    f"node FSM state stayed CATCHINGBLOCKS for {format_duration(self.catchingblocks_wait)} "
                    "(Teranode allows no STOP while catching up): not quiesced, node left untouched")
            time.sleep(self.poll_interval)
            state = self.get_fsm_state()
        if state not in STOPPABLE_STATES | IDLE_STATES:
            raise NodeCommandError(f"node FSM state is {state}: drtool quiesces only from RUNNING, "
                                   "LEGACYSYNCING or IDLE; node left untouched")
        return state

    def _resume(self, previous_state: str | None, start_command: list[str]) -> list[str]:
        """Start the services and put the FSM back; the errors met (none: record deleted)."""
        errors: list[str] = []
        log.info("resuming the node: starting the Teranode services")
        try:
            self._run(start_command, "starting the Teranode services")
        except DrtoolError as exc:
            errors.append(str(exc))
        if previous_state and previous_state not in IDLE_STATES:
            try:
                self._restore_fsm(previous_state)
            except DrtoolError as exc:
                errors.append(str(exc))
        if errors:
            record = self._read_record() or {}
            record.update(resume_failed=True, resume_errors=errors)
            self._write_record(record)
        else:
            self._delete_record()
            log.info("node resumed (FSM %s)", previous_state)
        return errors

    def _restore_fsm(self, previous_state: str) -> None:
        """Set the FSM back to `previous_state` once the blockchain service answers again."""
        deadline = time.monotonic() + self.ready_wait
        while True:
            try:
                state = self.get_fsm_state()
                if state in IDLE_STATES:
                    self.set_fsm_state(previous_state)
                elif state != previous_state:
                    # e.g. CATCHINGBLOCKS: the node moved on by itself; forcing it would be wrong
                    log.info("node is %s after restart (was %s): leaving its FSM alone", state, previous_state)
                return
            except NodeCommandError as exc:
                if time.monotonic() >= deadline:
                    raise NodeCommandError(f"{exc} (retried for {format_duration(self.ready_wait)} after start)") from None
                log.debug("blockchain service not ready yet: %s", exc)
                time.sleep(self.poll_interval)

    def recover_leftover_quiesce(self) -> str | None:
        """Undo a quiesce whose owner died (kill -9) or whose resume failed; a message, or None."""
        record = self._read_record()
        if record is None:
            return None
        pid = record.get("pid")
        host = record.get("host")
        since = record.get("started_at", "?")
        if not record.get("resume_failed"):
            if host != socket.gethostname():
                log.warning("%s: quiesce record of host %s (pid %s) left alone: this is %s",
                            self.record_path, host, pid, socket.gethostname())
                return None
            if isinstance(pid, int) and _pid_alive(pid, record.get("pid_start_time")):
                return None  # its owner is still running and will resume the node itself
        previous = record.get("previous_fsm_state")
        start_command = record.get("start_command") or self.start_command
        if not start_command:
            raise ConfigError(f"{self.record_path}: cannot resume the node: no start_command recorded or configured")
        why = "whose resume failed" if record.get("resume_failed") else "left by a dead drtool"
        errors = self._resume(previous, start_command)
        if errors:
            raise NodeCommandError(f"{self.record_path}: resuming a quiesce {why} (pid {pid}, since {since}) "
                                   f"failed: {'; '.join(errors)}")
        message = (f"{self.record_path}: undid a quiesce {why} (pid {pid} on {host}, since {since}): "
                   f"services started, FSM back to {previous}")
        log.warning("%s", message)
        return message


class NoQuiesce:
    """The quiesce of modes "none" (hot snapshot) and "offline" (node not running): a no-op."""

    previous_state: str | None = None

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.expired = threading.Event()

    def check(self) -> None:
        pass

    def __enter__(self) -> "NoQuiesce":
        return self

    def __exit__(self, *exc_info: object) -> bool:
        return False


_PREPARING, _ACTIVE, _RESUMING, _DONE = "preparing", "active", "resuming", "done"


class Quiesce:
    """One quiesce of a node (mode "stop"); use through `NodeControl.quiesce()`."""

    mode = "stop"

    def __init__(self, node: NodeControl) -> None:
        self.node = node
        self.previous_state: str | None = None
        self.expired = threading.Event()
        self._phase = _PREPARING  # our signal handlers raise only before _RESUMING
        self._phase_lock = threading.Lock()
        self._resume_lock = threading.Lock()
        self._resume_errors: list[str] | None = None
        self._resumed = threading.Event()
        self._done = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._owner = threading.current_thread()
        self._saved_handlers: dict[int, Any] = {}
        self._entered = False  # False while quiescing: errors then get "; node resumed"

    def check(self) -> None:
        """Raise QuiesceExpired once max_quiesce is exceeded (for bodies outside the main thread)."""
        if self.expired.is_set():
            raise QuiesceExpired(self._expired_message(resumed=False))

    def _expired_message(self, resumed: bool = True) -> str:
        outcome = "node resumed" if resumed else "resuming the node"
        return f"quiesce exceeded max_quiesce ({format_duration(self.node.max_quiesce)}): {outcome}"

    # -- signals ----------------------------------------------------------------------------

    def _install_handlers(self) -> None:
        if self._owner is not threading.main_thread():
            return  # only the main thread may set handlers; the daemon owns its signals
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._saved_handlers[signum] = signal.signal(signum, self._on_signal)

    def _restore_handlers(self) -> None:
        for signum, handler in self._saved_handlers.items():
            signal.signal(signum, handler)
        self._saved_handlers.clear()

    def _on_signal(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self._phase in (_RESUMING, _DONE):
            log.warning("%s received while resuming the node: finishing the resume first", name)
            return
        if self.expired.is_set():
            raise QuiesceExpired(self._expired_message(resumed=False))
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise QuiesceInterrupted(f"drtool received {name} during the quiesce")

    # -- watchdog ---------------------------------------------------------------------------

    def _start_watchdog(self) -> None:
        self._watchdog = threading.Thread(target=self._watch, name="drtool-quiesce-watchdog", daemon=True)
        self._watchdog.start()

    def _watch(self) -> None:
        if self._done.wait(self.node.max_quiesce.total_seconds()):
            return
        with self._phase_lock:
            if self._phase not in (_PREPARING, _ACTIVE):
                return
            self.expired.set()
            log.error("%s", self._expired_message(resumed=False))
            if self._saved_handlers:  # the owner is the main thread, with our handlers in place
                signal.pthread_kill(self._owner.ident, signal.SIGTERM)
        if not self._resumed.wait(self.node.resume_grace):
            log.error("the backup did not stop within %s of max_quiesce: resuming the node from the watchdog",
                      format_duration(self.node.resume_grace))
            self._resume_once()

    # -- enter / exit -----------------------------------------------------------------------

    def __enter__(self) -> "Quiesce":
        node = self.node
        if node._read_record() is not None:
            node.recover_leftover_quiesce()
            record = node._read_record()
            if record is not None:
                raise DrtoolError(f"{node.record_path}: the node is already quiesced by pid {record.get('pid')} "
                                  f"on {record.get('host')} since {record.get('started_at')}: not quiescing it twice")
        self._install_handlers()
        try:
            self.previous_state = node._settled_state()
        except BaseException:
            self._phase = _DONE
            self._restore_handlers()
            raise
        try:
            node._write_record(node._new_record(self.previous_state))
            self._start_watchdog()
            self._phase = _ACTIVE
            if self.previous_state in STOPPABLE_STATES:
                log.info("setting the FSM from %s to IDLE", self.previous_state)
                node.set_fsm_state("idle")
            log.info("stopping the Teranode services")
            node._run(node.stop_command, "stopping the Teranode services")
        except BaseException as exc:
            raise self._finish(exc) or exc  # resumes first
        self._entered = True
        log.info("node quiesced (FSM was %s)", self.previous_state)
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> bool:
        late = self._finish(exc)
        if late is not None and late is not exc:
            raise late  # a signal that landed as the body ended
        return False  # the body's own exception propagates unchanged

    def _resume_once(self) -> list[str]:
        """Resume exactly once, whoever asks first (the owner or the watchdog)."""
        with self._resume_lock:
            if self._resume_errors is None:
                self._resume_errors = self.node._resume(self.previous_state, self.node.start_command)
                self._resumed.set()
            return self._resume_errors

    def _finish(self, pending: BaseException | None) -> BaseException | None:
        """Resume the node; raise what replaces `pending`, else return what the caller re-raises."""
        while True:
            try:  # from here on our handlers no longer raise; one landing just before is kept
                with self._phase_lock:
                    self._phase = _RESUMING
                break
            except BaseException as late:  # noqa: BLE001 - a signal raised in the window
                pending = pending or late
        try:
            errors = self._resume_once()
        finally:
            self._done.set()
            if self._watchdog is not None and self._watchdog is not threading.current_thread():
                self._watchdog.join()  # before restoring handlers: it may still signal us
            self._phase = _DONE
            self._restore_handlers()
        if errors:
            raise NodeCommandError(f"resuming the node failed: {'; '.join(errors)}; {self.node.record_path} "
                                   "is kept and the next drtool run retries the resume") from pending
        if self.expired.is_set():
            raise QuiesceExpired(self._expired_message()) from None
        if isinstance(pending, QuiesceInterrupted):
            raise QuiesceInterrupted(f"{pending}: node resumed") from None
        if not self._entered and isinstance(pending, DrtoolError):
            # quiescing itself failed (setfsmstate, the stop command): say the node is back
            raise type(pending)(f"{pending}; node resumed") from None
        return pending


def make_node_control(node_cfg: Any, **tuning: Any) -> NodeControl:
    """A NodeControl from a config.NodeConfig-like object ([node] of drtool.toml).

    `tuning` passes catchingblocks_wait, command_timeout, poll_interval, ready_wait, resume_grace.
    """
    max_quiesce = node_cfg.max_quiesce
    if isinstance(max_quiesce, str):
        try:
            max_quiesce = parse_duration(max_quiesce)
        except ValueError as exc:
            raise ConfigError(f"[node] max_quiesce: {exc}") from None
    wait = getattr(node_cfg, "catchingblocks_wait", None)
    if isinstance(wait, str):
        wait = parse_duration(wait)
    if wait is not None:
        tuning.setdefault("catchingblocks_wait", wait)
        tuning.setdefault("poll_interval", min(5.0, max(0.05, wait.total_seconds() / 20)))
    return NodeControl(
        teranode_cli=node_cfg.teranode_cli, stop_command=node_cfg.stop_command,
        start_command=node_cfg.start_command, state_dir=node_cfg.state_dir, max_quiesce=max_quiesce,
        mode=node_cfg.quiesce, **tuning,
    )


def node_facts(node_cfg: Any) -> dict[str, Any]:
    """What a snapshot records about the node and a restore compares: Teranode's version (the
    compose .env's TERANODE_VERSION) and utxostore_utxoBatchSize (Teranode's settings), which
    must never change under a node's UTXO store."""
    facts: dict[str, Any] = {"version": None, "utxo_batch_size": None}
    env_file = getattr(node_cfg, "env_file", None)
    if env_file:
        try:
            for line in Path(env_file).read_text().splitlines():
                key, _, value = line.partition("=")
                if key.strip() == "TERANODE_VERSION":
                    facts["version"] = value.strip().strip('"').strip("'") or None
        except OSError as exc:
            raise ConfigError(f"[node] env_file: {env_file}: cannot read: {exc.strerror}") from None
    settings_path = getattr(node_cfg, "teranode_settings", None)
    if settings_path:
        from drtool.teranode.settings import load_settings, stores_from_settings

        settings = load_settings(settings_path, context=getattr(node_cfg, "settings_context", "") or None)
        facts["utxo_batch_size"] = stores_from_settings(settings).get("utxo_batch_size")
    return facts
