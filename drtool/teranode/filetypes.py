"""Teranode's blob-store files: types, magics, names, folders, sidecars, temporaries.

Facts from Teranode's source (pkg fileformat, the file blob store); see
/work/shared/teranode.md. A file is `<64 hex>.<type>` where the hex is the 32-byte key
byte-reversed (the display form of txids and block hashes), one folder level deep
(first 2 hex characters, or the last 2 in the block store), and starts with an 8-byte
magic naming its type -- or no magic at all in older files and test fixtures.
"""

from __future__ import annotations

import re

MAGIC_LEN = 8

# file type (the file name extension) -> magics it may start with, space padded as
# Teranode writes them today. Older files pad with NUL instead (normalised on read).
FILE_TYPES: dict[str, tuple[bytes, ...]] = {
    "tx": (b"T-1.0   ",),
    "outputs": (b"O-1.0   ",),
    "subtree": (b"S-1.0   ",),
    "subtreeToCheck": (b"SC-1.0  ",),
    "subtreeMeta": (b"SM-1.0  ",),
    "subtreeData": (b"SD-1.0  ",),
    "block": (b"B-1.0   ",),
    "msgBlock": (b"MB-1.0  ",),
    "utxo-additions": (b"U-A-1.0 ",),
    "utxo-deletions": (b"U-D-1.0 ",),
    "utxo-set": (b"U-S-1.0 ",),
    "utxo-headers": (b"U-H-1.0 ", b"U-H-2.0 "),
    "bloomfilter": (b"BF-1.0  ",),
    "dat": (b"DAT-1.0 ",),
    "batch-data": (b"BD-1.0  ",),
    "batch-keys": (b"BK-1.0  ",),
    "testing": (b"TESTING ",),
}

MAGIC_TO_TYPE: dict[bytes, str] = {m: t for t, ms in FILE_TYPES.items() for m in ms}

# Types whose content may legitimately carry the other's magic: Teranode stores the
# same serialized subtree under either name (validated / still to validate).
_COMPATIBLE = {"subtree": "subtree", "subtreeToCheck": "subtree"}

# Sidecars written beside a blob: `<file>.sha256` (sha256sum format), `<file>.dah`
# (delete-at-height, decimal; up to v0.13) and `<file>.preserveUntil` (decimal height).
SIDECAR_EXTS = ("sha256", "dah", "preserveUntil")

# Folders a backup never carries (lock files of the subtree quorum).
IGNORED_DIRS = frozenset({"subtree_quorum"})

# Folder level: first 2 hex of the name (hashPrefix=2) or the last 2 (hashPrefix=-2, the
# block store, because block hashes start with zeros).
DEFAULT_HASH_PREFIX = {"blockstore": -2, "subtreestore": 2, "external": 2, "txstore": 2}

_HASH_NAME = re.compile(r"^([0-9a-f]{64})\.([A-Za-z0-9_\-]+)$")
_HEX2 = re.compile(r"^[0-9a-f]{2}$")


def normalize_magic(head: bytes) -> bytes:
    """The first 8 bytes with trailing NULs turned into spaces, as Teranode reads them."""
    magic = bytearray(head[:MAGIC_LEN])
    i = len(magic) - 1
    while i >= 0 and magic[i] == 0:
        magic[i] = 0x20
        i -= 1
    return bytes(magic)


def detect_magic(head: bytes) -> tuple[str | None, int]:
    """(file type, payload offset) from a file's first bytes; (None, 0) when no magic."""
    if len(head) < MAGIC_LEN:
        return None, 0
    ftype = MAGIC_TO_TYPE.get(normalize_magic(head))
    return (ftype, MAGIC_LEN) if ftype else (None, 0)


def magic_for(ftype: str, *, nul_padded: bool = False) -> bytes:
    """The magic Teranode writes for `ftype` (NUL padded like older versions on request)."""
    magic = FILE_TYPES[ftype][0]
    return magic.rstrip(b" ").ljust(MAGIC_LEN, b"\0") if nul_padded else magic


def same_family(magic_type: str, name_type: str) -> bool:
    """Whether a file named `.name_type` may carry the magic of `magic_type`."""
    return _COMPATIBLE.get(magic_type, magic_type) == _COMPATIBLE.get(name_type, name_type)


def parse_name(filename: str) -> tuple[str, str] | None:
    """`<64 hex>.<ext>` -> (hash hex, ext); None for anything else, sidecars and temporaries."""
    m = _HASH_NAME.match(filename)
    if not m or m.group(2) in SIDECAR_EXTS:
        return None
    return m.group(1), m.group(2)


def sidecar_target(filename: str) -> tuple[str, str] | None:
    """`<file>.sha256|.dah|.preserveUntil` -> (file name it describes, sidecar kind)."""
    if is_temporary(filename):
        return None
    base, dot, kind = filename.rpartition(".")
    if dot and base and kind in SIDECAR_EXTS:
        return base, kind
    return None


def is_temporary(filename: str) -> bool:
    """Teranode's atomic-write temporaries: `<final>.<rand>.tmp`, `.<final>.<rand>.tmp`,
    `health-check-*.tmp`, `*.dah.tmp` -- all end in `.tmp`, none is data."""
    return filename.endswith(".tmp")


def prefix_folder(hash_hex: str, hash_prefix: int) -> str:
    """The folder a file lives in for a store's hashPrefix (0: none)."""
    if hash_prefix > 0:
        return hash_hex[:hash_prefix]
    if hash_prefix < 0:
        return hash_hex[hash_prefix:]
    return ""


def relative_path(hash_hex: str, ext: str, hash_prefix: int) -> str:
    """`<folder>/<hash>.<ext>` relative to the store root."""
    folder = prefix_folder(hash_hex, hash_prefix)
    name = f"{hash_hex}.{ext}"
    return f"{folder}/{name}" if folder else name


def folder_mismatch(folder: str, hash_hex: str) -> bool:
    """True when `folder` looks like a hash-prefix folder but fits neither prefix rule."""
    return bool(_HEX2.match(folder)) and folder not in (hash_hex[:2], hash_hex[-2:])


def sha256_sidecar_text(digest_hex: str, filename: str) -> str:
    """A `.sha256` sidecar's content, sha256sum format (`sha256sum -c` accepts it)."""
    return f"{digest_hex}  {filename}\n"


def parse_sha256_sidecar(text: str) -> tuple[str, str] | None:
    """(hex digest, file name) from sha256sum format; None when malformed."""
    m = re.match(r"^([0-9a-fA-F]{64}) [ *](.+?)\s*$", text.strip("\n").split("\n", 1)[0])
    return (m.group(1).lower(), m.group(2)) if m else None


def parse_height(text: str) -> int | None:
    """A `.dah`/`.preserveUntil` sidecar's decimal height; None when malformed."""
    s = text.strip()
    return int(s) if s.isdigit() else None
