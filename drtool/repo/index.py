"""Where every blob lives: blob id -> (pack, offset, length, kind).

Index objects (`index/<sha256>`) are zstd-compressed JSON written during a backup (every
few packs, and at its end) so a backup killed half-way leaves its uploaded packs reusable.
In memory, ids are 32-byte keys and locations small tuples, to keep a million blobs cheap.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass

import zstandard


@dataclass(frozen=True)
class Location:
    pack: str  # pack key, "data/ab/ab..."
    offset: int
    length: int
    kind: str


class BlobIndex:
    def __init__(self) -> None:
        self._packs: list[str] = []
        self._pack_no: dict[str, int] = {}
        self.pack_sizes: dict[str, int] = {}
        self._blobs: dict[bytes, tuple[int, int, int, str]] = {}
        self._lock = threading.Lock()

    def __contains__(self, blob_id: str) -> bool:
        return bytes.fromhex(blob_id) in self._blobs

    def __len__(self) -> int:
        return len(self._blobs)

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
                self._blobs.setdefault(bytes.fromhex(blob_id), (no, offset, length, kind))

    def get(self, blob_id: str) -> Location | None:
        found = self._blobs.get(bytes.fromhex(blob_id))
        if found is None:
            return None
        no, offset, length, kind = found
        return Location(self._packs[no], offset, length, kind)

    def blobs_of(self) -> dict[str, list[tuple[str, int, int, str]]]:
        """pack -> [(blob id, offset, length, kind)] (for verify and prune)."""
        out: dict[str, list] = {p: [] for p in self._packs}
        for key, (no, offset, length, kind) in self._blobs.items():
            out[self._packs[no]].append((key.hex(), offset, length, kind))
        return out


def encode_index(packs: list[tuple[str, int, list[list]]]) -> tuple[str, bytes]:
    """An index object for (pack key, pack size, header entries) triples: (key, bytes)."""
    doc = {"v": 1, "packs": [{"pack": p, "size": s, "blobs": e} for p, s, e in packs]}
    obj = zstandard.ZstdCompressor(level=3).compress(json.dumps(doc, separators=(",", ":")).encode())
    return f"index/{hashlib.sha256(obj).hexdigest()}", obj


def decode_index(obj: bytes) -> list[tuple[str, int, list[list]]]:
    doc = json.loads(zstandard.ZstdDecompressor().decompressobj().decompress(obj))
    return [(p["pack"], p["size"], p["blobs"]) for p in doc["packs"]]
