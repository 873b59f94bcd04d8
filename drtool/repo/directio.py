"""Writes that bypass the page cache (O_DIRECT), for bytes drtool will not read back soon.

A pack written to a local repository, or a large file written by a restore, is not read again
by this process; through the page cache it costs a kernel copy per byte (the largest single
item in a backup's profile) and evicts what the node itself keeps cached. O_DIRECT hands the
pages to the device instead. It needs a buffer, offset and length aligned to the device's
block: the bytes are copied into a reused page-aligned buffer (a user-space copy, several
times cheaper than the kernel's), written whole-blocks, and the file cut back to its length.
Where the filesystem refuses O_DIRECT (tmpfs, some network filesystems), the caller writes the
ordinary way.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading

from drtool.repo.pack import private_memory

ALIGN = 4096  # a multiple of every logical block size in use (512 and 4096)
MIN_SIZE = 1 << 20  # below this the page cache's copy is cheap and a direct write's wait is not
_O_DIRECT = getattr(os, "O_DIRECT", 0)

_local = threading.local()
_refused: set[int] = set()  # st_dev of filesystems that refused O_DIRECT: not asked again


def supported(path: str | os.PathLike) -> bool:
    """False where O_DIRECT is unknown (not Linux) or the filesystem already refused it."""
    if not _O_DIRECT:
        return False
    try:
        return os.stat(path).st_dev not in _refused
    except OSError:
        return False


def _buffer(size: int) -> mmap.mmap:
    """This thread's page-aligned buffer, grown to `size` (anonymous mmaps are page-aligned)."""
    buf = getattr(_local, "buf", None)
    if buf is None or len(buf) < size:
        if buf is not None:
            buf.close()
        buf = _local.buf = private_memory(-(-size // (1 << 20)) << 20)  # whole MiB: few regrowths
    return buf


def open_new(path: str | os.PathLike, flags: int, mode: int = 0o666, direct: bool = True) -> tuple[int, bool]:
    """os.open(path, flags | O_CREAT | O_EXCL, mode), with O_DIRECT when `direct` and the
    filesystem takes it: (fd, whether O_DIRECT is on)."""
    flags |= os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    if direct and supported(os.path.dirname(os.fspath(path)) or "."):
        try:
            return os.open(path, flags | _O_DIRECT, mode), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            _refuse(os.path.dirname(os.fspath(path)) or ".")
    return os.open(path, flags, mode), False


def write(fd: int, pieces, size: int, direct: bool) -> None:
    """Write `pieces` (`size` bytes in all) from the start of a new file. With O_DIRECT on `fd`
    (`direct`): copied into the aligned buffer, zero-padded to whole blocks, written, and the
    file cut back to `size`; where the device wants a larger alignment than ALIGN, O_DIRECT is
    turned off on `fd` and the same bytes are written the ordinary way."""
    if not direct:
        pos = 0
        for piece in pieces:
            with memoryview(piece) as view:
                _write_at(fd, view, pos)
            pos += len(piece)
        return
    padded = -(-size // ALIGN) * ALIGN
    buf = _buffer(padded)
    pos = 0
    for piece in pieces:
        buf[pos:pos + len(piece)] = piece
        pos += len(piece)
    if pos != size:
        raise ValueError(f"pieces hold {pos} bytes, not {size}")
    buf[size:padded] = bytes(padded - size)  # never put a previous file's bytes on the disk
    with memoryview(buf) as view:
        try:
            _write_at(fd, view[:padded], 0)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            _refuse_fd(fd)
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
            os.ftruncate(fd, 0)
            _write_at(fd, view[:size], 0)
            return
    if padded != size:
        os.ftruncate(fd, size)


def _write_at(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _refuse(directory: str) -> None:
    try:
        _refused.add(os.stat(directory).st_dev)
    except OSError:
        pass


def _refuse_fd(fd: int) -> None:
    _refused.add(os.fstat(fd).st_dev)
