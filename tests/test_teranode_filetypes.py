"""File types, magics, names, folders, sidecars and temporaries."""

from __future__ import annotations

from drtool.teranode import filetypes as ft

H = "00000000000000000a61d5ca638906e74376e36e7a080b58a513629496a41cc4"


def test_detect_magic_space_nul_and_absent():
    assert ft.detect_magic(b"S-1.0   rest") == ("subtree", 8)
    assert ft.detect_magic(b"S-1.0\0\0\0rest") == ("subtree", 8)  # older files pad with NUL
    assert ft.detect_magic(b"SC-1.0  ") == ("subtreeToCheck", 8)
    assert ft.detect_magic(b"U-H-2.0 ") == ("utxo-headers", 8)
    assert ft.detect_magic(b"DAT-1.0 ") == ("dat", 8)
    assert ft.detect_magic(b"\x00\x00\x00\x30abcd") == (None, 0)  # a bare block header
    assert ft.detect_magic(b"T-1.0") == (None, 0)
    for ftype in ft.FILE_TYPES:
        assert ft.detect_magic(ft.magic_for(ftype)) == (ftype, 8)
        assert ft.detect_magic(ft.magic_for(ftype, nul_padded=True)) == (ftype, 8)


def test_parse_name_and_sidecars():
    assert ft.parse_name(f"{H}.block") == (H, "block")
    assert ft.parse_name(f"{H}.utxo-headers") == (H, "utxo-headers")
    assert ft.parse_name(f"{H}.block.sha256") is None
    assert ft.parse_name(f"{H}.tx.dah") is None
    assert ft.parse_name(f"{H.upper()}.tx") is None
    assert ft.parse_name("lastProcessed.dat") is None
    assert ft.parse_name(f"{H}.tx.123.tmp") is None
    assert ft.sidecar_target(f"{H}.block.sha256") == (f"{H}.block", "sha256")
    assert ft.sidecar_target(f"{H}.tx.dah") == (f"{H}.tx", "dah")
    assert ft.sidecar_target(f"{H}.tx.dah.tmp") is None
    assert ft.sidecar_target(f"{H}.tx") is None


def test_temporaries_and_ignored():
    for name in (f"{H}.tx.8127.tmp", f".{H}.tx.8127.tmp", "health-check-123.tmp", f"{H}.tx.dah.tmp"):
        assert ft.is_temporary(name)
    assert not ft.is_temporary(f"{H}.tx")
    assert "subtree_quorum" in ft.IGNORED_DIRS


def test_prefix_folders():
    assert ft.prefix_folder(H, 2) == "00"
    assert ft.prefix_folder(H, -2) == "c4"
    assert ft.prefix_folder(H, 0) == ""
    assert ft.relative_path(H, "block", ft.DEFAULT_HASH_PREFIX["blockstore"]) == f"c4/{H}.block"
    assert ft.relative_path(H, "tx", ft.DEFAULT_HASH_PREFIX["external"]) == f"00/{H}.tx"
    assert ft.folder_mismatch("ab", H) and not ft.folder_mismatch("c4", H) and not ft.folder_mismatch("171", H)


def test_sidecar_formats():
    text = ft.sha256_sidecar_text("ab" * 32, f"{H}.block")
    assert text == f"{'ab' * 32}  {H}.block\n"
    assert ft.parse_sha256_sidecar(text) == ("ab" * 32, f"{H}.block")
    assert ft.parse_sha256_sidecar(f"{'AB' * 32} *{H}.block") == ("ab" * 32, f"{H}.block")
    assert ft.parse_sha256_sidecar("nonsense") is None
    assert ft.parse_height("905925\n") == 905925
    assert ft.parse_height("-1") is None
