"""Teranode-level checks of a blob-store folder (restored or live).

Each file is checked against Teranode's own hashes: a block's name is the hash of its
80-byte header, a `.tx` name its txid, an `.outputs` file embeds its txid, a subtree's
name is the merkle root of its nodes, a `.subtreeData` holds the transactions of its
subtree, `.utxo-*` files embed their block hash; a `.sha256` sidecar must match. Files
of a type with no such rule are counted as unchecked, never as failed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from drtool.teranode import filetypes as ft
from drtool.teranode.hashes import (
    COINBASE_PLACEHOLDER,
    HASH_LEN,
    HEADER_LEN,
    block_hash,
    dsha256,
    hash_to_name,
    merkle_root,
    parse_subtree,
    scan_tx,
    txid,
)

log = logging.getLogger(__name__)

WARNING = "warning"
ERROR = "error"

# Content checks read the whole file (txs, subtrees, subtree data); past this size only
# the sidecar is checked and the content counts as unchecked.
MAX_CONTENT_CHECK = 512 * 1024 * 1024
# Sidecars Teranode is known to write unreliably: a mismatch is a warning only.
UNRELIABLE_SHA256 = frozenset({"utxo-headers"})

_SUBTREE_TYPES = ("subtree", "subtreeToCheck")
_SUBTREE_DATA_TYPES = ("subtreeData", "subtree_data")  # the second: Teranode's test fixtures
_UTXO_TYPES = ("utxo-additions", "utxo-deletions", "utxo-set", "utxo-headers")


@dataclass(frozen=True)
class Finding:
    path: str
    problem: str
    severity: str = ERROR


@dataclass
class FileCheck:
    path: str
    checked: bool = False  # at least one of Teranode's rules applied to the file
    findings: list[Finding] = field(default_factory=list)

    def fail(self, problem: str, severity: str = ERROR) -> None:
        self.findings.append(Finding(self.path, problem, severity))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _check_sha256_sidecar(path: Path, ext: str | None, fc: FileCheck) -> None:
    sidecar = path.with_name(path.name + ".sha256")
    try:
        text = sidecar.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return
    severity = WARNING if ext in UNRELIABLE_SHA256 else ERROR
    fc.checked = True
    parsed = ft.parse_sha256_sidecar(text)
    if parsed is None:
        fc.fail(f"{sidecar.name} is not in sha256sum format", severity)
        return
    digest, named = parsed
    if os.path.basename(named) != path.name:
        fc.fail(f"{sidecar.name} names {named!r}, not {path.name}", severity)
    actual = _sha256_file(path)
    if actual != digest:
        fc.fail(f"SHA-256 {actual} does not match {sidecar.name} ({digest})", severity)


def _check_content(path: Path, name_hash: str, ext: str, fc: FileCheck) -> None:
    with open(path, "rb") as f:
        head = f.read(8)
        magic_type, offset = ft.detect_magic(head)
        if magic_type and not ft.same_family(magic_type, ext):
            fc.checked = True
            fc.fail(f"starts with the magic of a .{magic_type} file, but is named .{ext}")
            return
        f.seek(offset)
        if ext in ("block", "msgBlock"):
            header = f.read(HEADER_LEN)
            fc.checked = True
            if len(header) < HEADER_LEN:
                fc.fail(f"too short for a block header ({len(header)} bytes after the magic)")
            elif (got := hash_to_name(block_hash(header))) != name_hash:
                fc.fail(f"block header hashes to {got}, not the file name")
            return
        if ext == "outputs" or (ext in _UTXO_TYPES and magic_type):
            # .outputs: UTXOWrapper bytes, txid first; .utxo-*: block hash after the magic.
            # Without a magic the .utxo-* layout is version dependent: left unchecked.
            embedded = f.read(HASH_LEN)
            fc.checked = True
            if len(embedded) < HASH_LEN:
                fc.fail("too short to hold its 32-byte key")
            elif (got := hash_to_name(embedded)) != name_hash:
                fc.fail(f"embeds key {got}, not the file name")
            return
        if ext not in ("tx", *_SUBTREE_TYPES, *_SUBTREE_DATA_TYPES):
            return
        if os.fstat(f.fileno()).st_size > MAX_CONTENT_CHECK:
            log.info("%s: larger than %d bytes, content not checked", path, MAX_CONTENT_CHECK)
            return
        payload = f.read()
    if ext == "tx":
        fc.checked = True
        try:
            got = hash_to_name(txid(payload))
        except ValueError as exc:
            fc.fail(f"not a transaction: {exc}")
            return
        if got != name_hash:
            fc.fail(f"transaction id is {got}, not the file name")
    elif ext in _SUBTREE_TYPES:
        fc.checked = True
        try:
            st = parse_subtree(payload)
        except ValueError as exc:
            fc.fail(str(exc))
            return
        computed = merkle_root(st.nodes)
        if st.declared_root is not None and st.declared_root != computed:
            fc.fail(f"declares root {hash_to_name(st.declared_root)}, its nodes give {hash_to_name(computed)}")
        elif (got := hash_to_name(computed)) != name_hash:
            fc.fail(f"merkle root of its {len(st.nodes)} nodes is {got}, not the file name")
    else:
        _check_subtree_data(path, name_hash, payload, fc)


def _check_subtree_data(path: Path, name_hash: str, payload: bytes, fc: FileCheck) -> None:
    """A subtree's transactions, in node order, without the coinbase placeholder: checked
    against the sibling subtree file when there is one."""
    for sibling_ext in _SUBTREE_TYPES:
        sibling = path.with_name(f"{name_hash}.{sibling_ext}")
        try:
            raw = sibling.read_bytes()
        except FileNotFoundError:
            continue
        break
    else:
        return  # nothing to compare with: unchecked
    fc.checked = True
    try:
        nodes = parse_subtree(raw[ft.detect_magic(raw[:8])[1] :]).nodes
    except ValueError:
        return  # the subtree file reports its own problem
    expected = [n for n in nodes if n != COINBASE_PLACEHOLDER]
    ids, pos = [], 0
    try:
        while pos < len(payload):
            std, pos = scan_tx(payload, pos)
            ids.append(dsha256(std))
    except ValueError as exc:
        fc.fail(f"transaction {len(ids)} is malformed: {exc}")
        return
    if ids != expected:
        fc.fail(f"its {len(ids)} transactions do not match the {len(expected)} nodes of {sibling.name}")


def _check_height_sidecar(path: Path, kind: str, fc: FileCheck) -> None:
    fc.checked = True
    if ft.parse_height(path.read_text(encoding="ascii", errors="replace")) is None:
        fc.fail(f".{kind} sidecar does not hold a decimal block height")


def check_file_detail(path: str | os.PathLike) -> FileCheck:
    """Every applicable check of one file; `checked` False when no rule applies."""
    path = Path(path)
    fc = FileCheck(str(path))
    name = path.name
    target = ft.sidecar_target(name)
    if target is not None:
        base, kind = target
        if not path.with_name(base).exists():
            fc.checked = True
            fc.fail(f"sidecar of {base}, which is missing", WARNING)
        if kind != "sha256":
            _check_height_sidecar(path, kind, fc)
        return fc
    parsed = ft.parse_name(name)
    ext = parsed[1] if parsed else None
    _check_sha256_sidecar(path, ext, fc)
    if parsed is None:
        return fc
    name_hash, ext = parsed
    if ft.folder_mismatch(path.parent.name, name_hash):
        fc.checked = True
        fc.fail(f"is in folder {path.parent.name}/, which fits neither hash prefix rule")
    _check_content(path, name_hash, ext, fc)
    return fc


def check_file(path: str | os.PathLike) -> list[Finding]:
    """Findings for one file (empty when it passes or no rule applies)."""
    return check_file_detail(path).findings


class TreeCheck:
    """Iterate for the findings of every file under `root`; afterwards `checked` and
    `unchecked` count the data files (sidecars are counted with their file, temporaries
    and ignored folders are skipped). A file that vanishes mid-check was deleted, not
    damaged, and is skipped."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.checked = 0
        self.unchecked = 0
        self.skipped = 0
        self.findings: list[Finding] = []

    def __iter__(self) -> Iterator[Finding]:
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if d not in ft.IGNORED_DIRS)
            for name in sorted(filenames):
                if ft.is_temporary(name):
                    self.skipped += 1
                    continue
                path = Path(dirpath, name)
                try:
                    fc = check_file_detail(path)
                except FileNotFoundError:
                    log.debug("%s vanished during the check (deleted)", path)
                    continue
                except OSError as exc:
                    fc = FileCheck(str(path), True, [Finding(str(path), f"cannot be read: {exc.strerror}")])
                if ft.sidecar_target(name) is None:
                    if fc.checked:
                        self.checked += 1
                    else:
                        self.unchecked += 1
                for finding in fc.findings:
                    self.findings.append(finding)
                    yield finding

    def run(self) -> TreeCheck:
        """Run to the end (findings in `.findings`) and return self."""
        for _ in self:
            pass
        return self

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]


def check_tree(root: str | os.PathLike) -> TreeCheck:
    """Findings for every file under `root` (iterate), with counts on the returned object."""
    return TreeCheck(root)
