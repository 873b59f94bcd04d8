"""Content-defined chunking (FastCDC) of files and streams.

Cut points depend only on the bytes, so an insertion early in a dump or an unchanged
file at another path yields the same chunks and the repository stores them once.
"""

from __future__ import annotations

from typing import BinaryIO, Iterable, Iterator

import fastcdc

MIN_SIZE = 1 << 20
AVG_SIZE = 2 << 20
MAX_SIZE = 8 << 20
SINGLE_BLOB_LIMIT = 2 * MIN_SIZE  # smaller files are one blob: no chunker call at all
READ_SIZE = 4 * MAX_SIZE


def split(pieces: Iterable[bytes]) -> Iterator[bytes]:
    """Re-cut an iterable of byte pieces (any sizes) into content-defined chunks."""
    buf = bytearray()
    for piece in pieces:
        buf += piece
        if len(buf) < READ_SIZE:
            continue
        view = memoryview(buf)
        cuts = list(fastcdc.fastcdc(view, MIN_SIZE, AVG_SIZE, MAX_SIZE, fat=False))
        # The last cut ends where the buffer ends, not at a content boundary: keep it.
        for cut in cuts[:-1]:
            yield bytes(view[cut.offset:cut.offset + cut.length])
        keep = cuts[-1].offset
        view.release()
        del buf[:keep]
    if buf:
        view = memoryview(buf)
        for cut in fastcdc.fastcdc(view, MIN_SIZE, AVG_SIZE, MAX_SIZE, fat=False):
            yield bytes(view[cut.offset:cut.offset + cut.length])
        view.release()


def read_pieces(f: BinaryIO, size: int = READ_SIZE) -> Iterator[bytes]:
    while True:
        piece = f.read(size)
        if not piece:
            return
        yield piece
