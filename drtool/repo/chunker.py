"""Content-defined chunking (FastCDC) of files and streams.

Cut points depend only on the bytes, so an insertion early in a dump or an unchanged
file at another path yields the same chunks and the repository stores them once.
"""

from __future__ import annotations

from typing import BinaryIO, Callable, Iterable, Iterator

import fastcdc

MIN_SIZE = 1 << 20
AVG_SIZE = 2 << 20
MAX_SIZE = 8 << 20
SINGLE_BLOB_LIMIT = 2 * MIN_SIZE  # smaller files are one blob: no chunker call at all
READ_SIZE = 4 * MAX_SIZE


def _cuts(buf) -> list:
    """FastCDC's cut points (offset, length) over a buffer, with the repository's sizes."""
    return list(fastcdc.fastcdc(buf, MIN_SIZE, AVG_SIZE, MAX_SIZE, fat=False))


def split(pieces: Iterable[bytes]) -> Iterator[memoryview]:
    """Re-cut an iterable of byte pieces (any sizes) into content-defined chunks.

    Chunks are views into the pieces (or their join): hash them and hand them to the packer,
    which copies, rather than keep them, since a view holds its whole buffer. A piece of
    READ_SIZE or more is cut where it lies, so a file read in one piece is not copied here."""
    held: list[bytes] = []
    held_size = 0
    for piece in pieces:
        held.append(piece)
        held_size += len(piece)
        if held_size < READ_SIZE:
            continue
        buf = held[0] if len(held) == 1 else b"".join(held)
        cuts = _cuts(buf)
        view = memoryview(buf)
        # The last cut ends where the buffer ends, not at a content boundary: keep it.
        for cut in cuts[:-1]:
            yield view[cut.offset:cut.offset + cut.length]
        held = [bytes(view[cuts[-1].offset:])]
        held_size = len(held[0])
    if held_size:
        buf = held[0] if len(held) == 1 else b"".join(held)
        view = memoryview(buf)
        for cut in _cuts(buf):
            yield view[cut.offset:cut.offset + cut.length]


def split_reader(readinto: Callable[[memoryview], int]) -> Iterator[memoryview]:
    """split() for a source that can fill a buffer (`readinto`, 0 at its end): one buffer of
    READ_SIZE is filled and cut again and again, so a stream of any length allocates nothing
    per chunk. Each chunk is a view into that buffer, valid until the next one is asked for."""
    buf = bytearray(READ_SIZE)
    view = memoryview(buf)
    filled = 0
    while True:
        n = readinto(view[filled:])
        filled += n
        if n and filled < READ_SIZE:
            continue
        cuts = _cuts(view[:filled]) if filled else []
        if not n:  # the end: every cut is final
            yield from (view[c.offset:c.offset + c.length] for c in cuts)
            return
        # The last cut ends where the buffer ends, not at a content boundary: keep it.
        for cut in cuts[:-1]:
            yield view[cut.offset:cut.offset + cut.length]
        keep = cuts[-1].offset
        view[:filled - keep] = view[keep:filled]  # the uncut tail moves to the front (a memmove)
        filled -= keep


def read_pieces(f: BinaryIO, size: int = READ_SIZE) -> Iterator[bytes]:
    while True:
        piece = f.read(size)
        if not piece:
            return
        yield piece
