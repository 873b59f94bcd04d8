"""Writes past the page cache (repo/directio.py) on a real filesystem: a local repository's packs
and a restore's large files are byte-exact whatever their length, are not left in the page
cache, and fall back to ordinary writes where the kernel refuses O_DIRECT. Also the pack decoder's
two paths (one call when a frame says its size, pieces when it does not)."""

from __future__ import annotations

import os
import random

import pytest
import zstandard

from drtool.errors import IntegrityError
from drtool.progress import Progress
from drtool.repo import directio, native, pack
from drtool.repo.base import TreeSpec
from drtool.repo.native import NativeRepository
from drtool.repo.objectstore import LocalStore

_NOWAIT = getattr(os, "RWF_NOWAIT", None)


def _direct_or_skip(folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if not directio.supported(folder):
        pytest.skip(f"{folder}: O_DIRECT is not available here (not Linux, or the filesystem refuses it)")
    probe = folder / ".probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | directio._O_DIRECT, 0o600))
    except OSError as exc:
        pytest.skip(f"{folder}: the filesystem refuses O_DIRECT ({exc.strerror})")
    finally:
        probe.unlink(missing_ok=True)


def _cached(path, length: int) -> bool:
    """True if the first `length` bytes of the file can be read without waiting for the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(length)], 0, _NOWAIT)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _backed_up(repo_dir, src) -> dict:
    """A snapshot of folder `src` in a new repository at `repo_dir`: its tree reference."""
    store = LocalStore(repo_dir)
    NativeRepository.init(store)
    session = NativeRepository(store).begin_backup()
    ref = session.store_tree(TreeSpec("store", src), None, Progress("test"))
    session.commit({"test": True})
    return ref


@pytest.fixture
def no_refusals():
    """Each test starts and ends with no filesystem marked as refusing O_DIRECT."""
    saved = set(directio._refused)
    directio._refused.clear()
    yield
    directio._refused.clear()
    directio._refused.update(saved)


@pytest.mark.parametrize("size", [directio.MIN_SIZE, directio.MIN_SIZE + 1, 3 * directio.MIN_SIZE + 4095])
def test_a_large_object_is_written_exactly_and_not_through_the_page_cache(tmp_path, size, no_refusals):
    _direct_or_skip(tmp_path / "repo")
    store = LocalStore(tmp_path / "repo")
    data = random.Random(size).randbytes(size)
    store.put("data/ab/large", data)
    path = tmp_path / "repo" / "data" / "ab" / "large"
    if _NOWAIT is not None:  # before anything reads it
        assert not _cached(path, directio.MIN_SIZE // 2)
        store.put("data/ab/small", data[:1000])  # below MIN_SIZE: the ordinary way, cached
        assert _cached(tmp_path / "repo" / "data" / "ab" / "small", 1000)
    assert path.read_bytes() == data and path.stat().st_size == size
    assert sorted(p.name for p in path.parent.iterdir()) == ["large", "small"][:1 + (_NOWAIT is not None)]


def test_a_write_the_kernel_refuses_falls_back_to_the_ordinary_way(tmp_path, monkeypatch, no_refusals):
    """With no alignment at all, an odd-length O_DIRECT write is refused by the kernel (EINVAL):
    the same bytes are written the ordinary way, and the filesystem is not asked again."""
    _direct_or_skip(tmp_path / "repo")
    monkeypatch.setattr(directio, "ALIGN", 1)
    store = LocalStore(tmp_path / "repo")
    data = random.Random(2).randbytes(directio.MIN_SIZE + 3)
    store.put("data/cd/odd", data)
    assert (tmp_path / "repo" / "data" / "cd" / "odd").read_bytes() == data
    assert os.stat(tmp_path / "repo").st_dev in directio._refused
    assert not directio.supported(tmp_path / "repo")
    store.put("data/cd/odd2", data)  # straight to the ordinary way now
    assert (tmp_path / "repo" / "data" / "cd" / "odd2").read_bytes() == data


def test_a_restore_writes_large_files_exactly_with_their_mode_and_mtime(tmp_path, no_refusals):
    """Files of one blob and of several (chunked), at lengths that are not whole blocks, and
    small ones beside them: byte-identical, with their modes and mtimes."""
    _direct_or_skip(tmp_path / "dest")
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(11)
    sizes = {"one-blob": directio.MIN_SIZE + 17, "chunked": 5 * directio.MIN_SIZE + 4097,
             "exact": 2 * directio.ALIGN * 256, "small": 999, "empty": 0}
    for i, (name, size) in enumerate(sizes.items()):
        path = src / name
        path.write_bytes(rng.randbytes(size))
        os.chmod(path, 0o640 if i % 2 else 0o604)
        os.utime(path, ns=(1_600_000_000_000_000_000 + i, 1_600_000_000_000_000_000 + i))
    ref = _backed_up(tmp_path / "repo", src)
    dest = tmp_path / "dest"
    NativeRepository(LocalStore(tmp_path / "repo")).restore_tree(ref, dest, Progress("test"))
    if _NOWAIT is not None:  # before anything reads it
        assert not _cached(dest / "one-blob", directio.MIN_SIZE // 2)
    for name in sizes:
        a, b = (src / name).stat(), (dest / name).stat()
        assert (dest / name).read_bytes() == (src / name).read_bytes(), name
        assert (b.st_mode & 0o7777, b.st_mtime_ns) == (a.st_mode & 0o7777, a.st_mtime_ns), name


def test_a_restore_that_fails_its_check_leaves_no_large_file_half_written(tmp_path, monkeypatch, no_refusals):
    """A multi-blob file whose whole-file SHA-256 does not match raises before anything of it is
    written through O_DIRECT (it is written only after the check)."""
    _direct_or_skip(tmp_path / "dest")
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(random.Random(4).randbytes(5 * directio.MIN_SIZE))
    ref = _backed_up(tmp_path / "repo", src)
    walk = native.NativeRepository._walk_entries

    def tampered(self, entries, rel):
        for op, path, entry in walk(self, entries, rel):
            if op == "file":
                entry = {**entry, "sha256": "0" * 64}
            yield op, path, entry

    monkeypatch.setattr(native.NativeRepository, "_walk_entries", tampered)
    dest = tmp_path / "dest"
    with pytest.raises(IntegrityError, match="does not match"):
        NativeRepository(LocalStore(tmp_path / "repo")).restore_tree(ref, dest, Progress("test"))
    assert (dest / "big").stat().st_size == 0


# ---- the pack decoder ------------------------------------------------------------------------------

def test_packs_decode_whether_or_not_their_frame_says_its_size():
    """compress() writes the size (one call); packs of earlier versions were streamed through
    compressobj(), which does not (decoded in pieces). Both decode to the same bytes."""
    raw = random.Random(8).randbytes(300_000) + bytes(200_000)
    header = zstandard.ZstdCompressor().compress(b'{"v":1,"blobs":[]}')
    trailer = pack.TRAILER.pack(len(header), pack.MAGIC)
    one_call = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(raw)
    cobj = zstandard.ZstdCompressor(level=1, write_checksum=True).compressobj()
    streamed = cobj.compress(raw) + cobj.flush()
    assert zstandard.frame_content_size(one_call) == len(raw)
    assert zstandard.frame_content_size(streamed) == -1
    for body in (one_call, streamed):
        assert pack.decode_body(body + header + trailer, "k") == raw


def test_a_damaged_pack_body_is_an_integrity_error_naming_the_pack():
    obj, _entries = pack.encode([(pack.DATA, "a" * 64, random.Random(9).randbytes(100_000))], 1)
    damaged = bytearray(obj)
    damaged[len(obj) // 3] ^= 0x55
    with pytest.raises(IntegrityError, match="pack data/xx/yy"):
        pack.decode_body(bytes(damaged), "data/xx/yy")
