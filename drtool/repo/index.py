"""Where every blob lives: blob id -> (pack, offset, length, kind).

Index objects (`index/<sha256>`) are zstd-compressed JSON written during a backup (every
few packs, and at its end) so a backup killed half-way leaves its uploaded packs reusable.

In memory the index holds no object per blob (a dict of bytes -> tuple cost ~250 bytes a
blob, 250 MB for a node of a million files): full ids sit in one bytearray, locations in
typed arrays, and a lookup is a binary search (bisect, in C) over a sorted array of 8-byte id
prefixes, its hit confirmed against the full id. The newest blobs wait in a small dict until
they are merged in. About 60 bytes a blob.
"""

from __future__ import annotations

import hashlib
import json
import threading
from array import array
from bisect import bisect_left, bisect_right
from typing import NamedTuple

import zstandard

from drtool.repo import pack

ID_BYTES = 32
MERGE_AT = 1 << 15  # newest blobs held in a dict before they join the sorted arrays
assert array("I").itemsize == 4 and array("Q").itemsize == 8


class Location(NamedTuple):  # a tuple: made once per blob a restore writes, so made cheaply
    pack: str  # pack key, "data/ab/ab..."
    offset: int
    length: int
    kind: str


class BlobIndex:
    def __init__(self) -> None:
        self._packs: list[str] = []
        self._pack_no: dict[str, int] = {}
        self.pack_sizes: dict[str, int] = {}
        self._kinds: list[str] = []                # kind code -> kind ("d", "t")
        # one row a blob, in the order blobs were added
        self._ids = bytearray()                    # row r: bytes [32r, 32r + 32)
        self._pack = array("I")
        self._offset = array("I")
        self._length = array("I")
        self._kind = array("B")
        # lookup: (sorted 8-byte id prefixes, their rows), swapped whole at a merge so a
        # reader in another thread never sees one half new and one half old
        self._sorted: tuple[array, array] = (array("Q"), array("I"))
        self._recent: dict[bytes, int] = {}        # id -> row, not yet in _sorted
        self._lock = threading.Lock()

    def __contains__(self, blob_id: str) -> bool:
        return self._row(bytes.fromhex(blob_id)) is not None

    def __len__(self) -> int:
        return len(self._kind)

    def has_pack(self, pack: str) -> bool:
        return pack in self._pack_no

    def packs(self) -> list[str]:
        return list(self._packs)

    def add_pack(self, pack: str, size: int, entries: list[list]) -> None:
        with self._lock:
            no = self._pack_no.get(pack)
            if no is None:
                no = self._pack_no[pack] = len(self._packs)
                self._packs.append(pack)
            self.pack_sizes[pack] = size
            for kind, blob_id, offset, length in entries:
                key = bytes.fromhex(blob_id)
                if len(key) != ID_BYTES:
                    raise ValueError(f"{pack}: blob id {blob_id!r} is not a SHA-256")
                if self._row(key) is not None:
                    continue  # the first location of a blob stays its location
                if kind not in self._kinds:
                    self._kinds.append(kind)
                row = len(self._kind)
                # the row is complete before it becomes findable (readers do not lock)
                self._ids += key
                self._pack.append(no)
                self._offset.append(offset)
                self._length.append(length)
                self._kind.append(self._kinds.index(kind))
                self._recent[key] = row
            if len(self._recent) >= MERGE_AT:
                self._merge()

    def get(self, blob_id: str) -> Location | None:
        row = self._row(bytes.fromhex(blob_id))
        if row is None:
            return None
        return Location(self._packs[self._pack[row]], self._offset[row], self._length[row],
                        self._kinds[self._kind[row]])

    def blobs_of(self) -> dict[str, list[tuple[str, int, int, str]]]:
        """pack -> [(blob id, offset, length, kind)] (for verify and prune)."""
        out: dict[str, list] = {p: [] for p in self._packs}
        ids, packs, kinds = self._ids, self._packs, self._kinds
        for row in range(len(self._kind)):
            out[packs[self._pack[row]]].append((ids[ID_BYTES * row:ID_BYTES * (row + 1)].hex(),
                                                self._offset[row], self._length[row], kinds[self._kind[row]]))
        return out

    def tiny_blobs_by_pack(self, max_length: int) -> dict[str, list[tuple[str, int, int]]]:
        """pack -> [(blob id, offset, length)] of its blobs of at most max_length bytes."""
        out: dict[str, list] = {}
        ids, packs, offsets, pack_of = self._ids, self._packs, self._offset, self._pack
        for row in [r for r, n in enumerate(self._length) if n <= max_length]:
            out.setdefault(packs[pack_of[row]], []).append(
                (ids[ID_BYTES * row:ID_BYTES * (row + 1)].hex(), offsets[row], self._length[row]))
        return out

    def _row(self, key: bytes) -> int | None:
        recent = self._recent  # read before _sorted: a merge swaps _sorted first
        row = recent.get(key)
        if row is not None:
            return row
        prefixes, rows = self._sorted
        prefix = int.from_bytes(key[:8], "big")
        i, n = bisect_left(prefixes, prefix), len(prefixes)
        while i < n and prefixes[i] == prefix:
            row = rows[i]
            if self._ids[ID_BYTES * row:ID_BYTES * (row + 1)] == key:
                return row
            i += 1
        return None

    def _merge(self) -> None:
        """Move the recent blobs into the sorted arrays: one pass of slice copies (C) between
        the insertion points, which bisect finds; O(n) bytes moved, O(recent) Python steps."""
        old_prefixes, old_rows = self._sorted
        prefixes, rows = array("Q"), array("I")
        start = 0
        for prefix, row in sorted((int.from_bytes(k[:8], "big"), r) for k, r in self._recent.items()):
            i = bisect_right(old_prefixes, prefix, start)
            prefixes += old_prefixes[start:i]
            rows += old_rows[start:i]
            prefixes.append(prefix)
            rows.append(row)
            start = i
        prefixes += old_prefixes[start:]
        rows += old_rows[start:]
        self._sorted = (prefixes, rows)
        self._recent = {}


def encode_index(packs: list[tuple[str, int, list[list]]]) -> tuple[str, bytes]:
    """An index object for (pack key, pack size, header entries) triples: (key, bytes)."""
    doc = {"v": 1, "packs": [{"pack": p, "size": s, "blobs": e} for p, s, e in packs]}
    obj = zstandard.ZstdCompressor(level=3).compress(json.dumps(doc, separators=(",", ":")).encode())
    return f"index/{hashlib.sha256(obj).hexdigest()}", obj


def decode_index(obj: bytes) -> list[tuple[str, int, list[list]]]:
    doc = json.loads(pack.decompress_frame(obj))
    return [(p["pack"], p["size"], p["blobs"]) for p in doc["packs"]]
