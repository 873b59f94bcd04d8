"""Half of a store's backup or restore in a forked process: a second interpreter, so a second core.

A store of many small files is backed up and restored at the speed of one Python thread: tree
building and decoding, index look-ups and the per-file system calls all wait for one
interpreter lock. Its top-level folders (Teranode's hash-prefix folders) are independent, so
half of them go to a forked copy of the process, which shares the loaded index. Measured on
the sample node's tx store alone (119k files, `drtool backup` / `restore`): backup 2.3-2.7 s
in one process, 1.5-1.6 s in two; restore 3.4-4.5 s, 2.5-2.8 s.

The child reports progress, its log records, folders it finished, then its result or its
error, as pickled messages on a pipe; it dies with the parent (PR_SET_PDEATHSIG), and the
parent kills it when it fails itself. The fork is made while the parent's own worker threads
are idle (between stores), and the child never touches the parent's threads, locks or
connections: it builds its own (ObjectStore.after_fork).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from drtool import errors

if TYPE_CHECKING:  # imported where a fork is made: every command imports this module
    from multiprocessing.connection import Connection

PROGRESS_EVERY = 0.2  # seconds between the child's progress messages


def die_with_parent(parent: int) -> None:
    """In a forked child: a parent killed with -9 cannot stop it, so Linux does
    (PR_SET_PDEATHSIG: it fires when the thread that forked the child ends)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux/glibc: the parent's own clean-up is all there is
    if os.getppid() != parent:  # the parent went before the request took effect
        os._exit(1)


class _PipeProgress:
    """The child's Progress: counts sent to the parent at most every PROGRESS_EVERY seconds."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()  # the child's worker threads advance it
        self.files = self.nbytes = 0
        self.sent = time.monotonic()

    def advance(self, files: int = 0, nbytes: int = 0) -> None:
        with self.lock:
            self.files += files
            self.nbytes += nbytes
            if time.monotonic() - self.sent >= PROGRESS_EVERY:
                self._flush()

    def _flush(self) -> None:
        if self.files or self.nbytes:
            self.conn.send(("progress", self.files, self.nbytes))
            self.files = self.nbytes = 0
        self.sent = time.monotonic()

    def send(self, message: tuple) -> None:
        with self.lock:
            self._flush()
            self.conn.send(message)


class _PipeLogHandler(logging.Handler):
    """The child's log records go to the parent, which logs them with its own handlers (a
    handler inherited mid-write, e.g. a console's lock, could block the child for good)."""

    def __init__(self, progress: _PipeProgress) -> None:
        super().__init__()
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.progress.send(("log", record.levelno, record.name, record.getMessage()))
        except Exception:  # noqa: BLE001 - the parent is gone: nobody to tell
            pass


class Forked:
    """A child process running `work(progress, folder_done)`; its (picklable) result by wait()."""

    def __init__(self, work: Callable[[Any, Callable[[Any], None]], Any], progress: Any) -> None:
        from multiprocessing.connection import Connection

        read_fd, write_fd = os.pipe()
        parent = os.getpid()
        # Objects that exist now are left out of the child's cycle collections: a collection
        # writes to every object it visits, which would copy the whole inherited heap.
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            self._child(work, Connection(write_fd, readable=False), parent)
        gc.unfreeze()
        os.close(write_fd)
        self.pid = pid
        self.folders: list[str] = []  # folders the child finished, handed on by the caller's thread
        self.result: Any = None
        self.finished = False
        self.error: tuple[str, str] | None = None
        self._conn = Connection(read_fd, writable=False)
        self._listener = threading.Thread(target=self._listen, args=(progress,), daemon=True,
                                          name="drtool-forked")
        self._listener.start()

    @staticmethod
    def _child(work, conn: Connection, parent: int) -> None:
        code = 1
        progress = _PipeProgress(conn)
        try:
            die_with_parent(parent)
            # The parent's signal handlers (a quiesced node's guard) are its own business: here
            # Ctrl-C ends the work with an error report, and SIGTERM ends the child outright.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            logging.root.handlers = [_PipeLogHandler(progress)]
            result = work(progress, lambda folder: progress.send(("folder", str(folder))))
            progress.send(("done", result))
            code = 0
        except BaseException as exc:  # noqa: BLE001 - everything is reported, then the child ends
            try:
                progress.send(("error", type(exc).__name__, str(exc)))
            except BaseException:  # noqa: BLE001 - the parent is gone: nobody to tell
                pass
        finally:
            os._exit(code)  # no atexit handlers, no flushing of the parent's inherited buffers

    def _listen(self, progress: Any) -> None:
        try:
            while True:
                message = self._conn.recv()
                kind = message[0]
                if kind == "done":
                    self.result, self.finished = message[1], True
                elif kind == "error":
                    self.error = (message[1], message[2])
                elif kind == "folder":
                    self.folders.append(message[1])
                else:
                    try:  # a display failing must not stop the draining: the child would block
                        if kind == "progress":
                            progress.advance(files=message[1], nbytes=message[2])
                        elif kind == "log":
                            logging.getLogger(message[2]).log(message[1], "%s", message[3])
                    except Exception:  # noqa: BLE001
                        pass
        except (EOFError, OSError):
            pass  # the child closed its end: it has ended
        finally:
            self._conn.close()

    def wait(self) -> Any:
        """The child's result once it ended; its error, raised here, if it failed."""
        _, status = os.waitpid(self.pid, 0)
        self._listener.join()
        if self.error:
            kind, message = self.error
            cls = getattr(errors, kind, None)
            if isinstance(cls, type) and issubclass(cls, errors.DrtoolError):
                raise cls(message)
            raise errors.RepositoryError(f"forked worker: {kind}: {message}")
        if not self.finished:
            raise errors.RepositoryError(f"forked worker process {self.pid} ended without finishing "
                                         f"(wait status {status})")
        return self.result

    def kill(self) -> None:
        """Stop the child now (the parent failed or was interrupted) and reap it."""
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        self._listener.join()
