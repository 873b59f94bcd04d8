"""The native repository's data path, in-process on a real folder: the chunker, pack buffers,
the walker's page-cache reads (and the reader threads behind them), and the restore's small-blob
memory that keeps deduplicated tiny files from refetching old packs."""

from __future__ import annotations

import hashlib
import io
import os
import random
import threading

import fastcdc
import pytest
from hypothesis import given, settings, strategies as st

from drtool.errors import IntegrityError
from drtool.progress import Progress
from drtool.repo import chunker, native, pack
from drtool.repo.base import TreeSpec
from drtool.repo.native import NativeRepository
from drtool.repo.objectstore import LocalStore


def _tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _random_store(src, seed: int, folders: int, suffix: str, sizes: tuple[int, int], files: int = 40):
    """Hash-prefix folders of `files` random files each: a blob store to back up."""
    rng = random.Random(seed)
    for d in range(folders):
        (src / f"{d:02x}").mkdir(parents=True)
        for i in range(files):
            (src / f"{d:02x}" / f"{i:03d}.{suffix}").write_bytes(rng.randbytes(rng.randrange(*sizes)))
    return src


def _restored(repo, ref, dest) -> dict[str, bytes]:
    """Restore `ref` into a new folder `dest`: what it holds."""
    dest.mkdir()
    repo.restore_tree(ref, dest, Progress("test"))
    return _tree(dest)


# ---- chunker ---------------------------------------------------------------------------------

_DATA = random.Random(7).randbytes(3 * chunker.READ_SIZE + 12_345)
_WHOLE = [(c.offset, c.length) for c in fastcdc.fastcdc(_DATA, chunker.MIN_SIZE, chunker.AVG_SIZE,
                                                        chunker.MAX_SIZE, fat=False)]


@settings(max_examples=12, deadline=None)
@given(st.lists(st.integers(1, 3 * chunker.MAX_SIZE), min_size=1, max_size=40))
def test_split_cuts_where_the_whole_stream_would_be_cut(sizes):
    """Whatever pieces the stream arrives in, the cuts are the content's: the same as one pass
    of FastCDC over the whole, except that a buffer boundary may force an extra cut only at
    READ_SIZE granularity (never here: READ_SIZE holds several maximal chunks)."""
    pieces, pos = [], 0
    for size in sizes:
        pieces.append(_DATA[pos:pos + size])
        pos += size
    pieces.append(_DATA[pos:])
    chunks = list(chunker.split(p for p in pieces if p))
    assert b"".join(bytes(c) for c in chunks) == _DATA
    offsets, at = [], 0
    for c in chunks:
        offsets.append((at, len(c)))
        at += len(c)
    assert offsets == _WHOLE


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 2**32), st.integers(1 << 16, 2 * chunker.MAX_SIZE))
def test_split_reader_cuts_like_split_whatever_each_read_returns(seed, most):
    """The reusable-buffer path (a pg_dump stream's readinto) gives the chunks one FastCDC pass
    over the whole gives, however short its reads; each chunk is taken before the next read."""
    rng = random.Random(seed)
    source = io.BytesIO(_DATA)

    def readinto(view):
        return source.readinto(view[:rng.randint(1, most)])

    got, at = [], 0
    for chunk in chunker.split_reader(readinto):
        assert bytes(chunk) == _DATA[at:at + len(chunk)]
        got.append((at, len(chunk)))
        at += len(chunk)
    assert got == _WHOLE


def test_split_reader_of_an_empty_stream_yields_nothing():
    assert list(chunker.split_reader(io.BytesIO(b"").readinto)) == []


def test_split_does_not_copy_a_file_read_in_one_piece():
    piece = _DATA[:chunker.READ_SIZE - 5]  # a file smaller than READ_SIZE is one piece
    chunks = list(chunker.split([piece]))
    assert len(chunks) > 3
    assert all(isinstance(c, memoryview) and c.obj is piece for c in chunks)
    # A bigger piece is cut where it lies; only its uncut tail is copied to meet the next.
    big = _DATA[:chunker.READ_SIZE + 5]
    assert next(chunker.split([big])).obj is big


# ---- packs -----------------------------------------------------------------------------------

def test_pack_buffer_round_trip():
    rng = random.Random(1)
    blobs = [(pack.DATA if i % 3 else pack.TREE, f"{i:064x}", rng.randbytes(rng.randrange(0, 5000)))
             for i in range(300)]
    blobs.append((pack.DATA, "f" * 64, memoryview(b"a view is copied in")))
    obj, entries = pack.encode(blobs, 1)
    body = pack.decode_body(obj, "k")
    assert pack.read_header(obj, "k") == entries
    for (kind, blob_id, data), (k, b, offset, length) in zip(blobs, entries):
        assert (k, b) == (kind, blob_id)
        assert body[offset:offset + length] == bytes(data)


def test_a_sealed_pack_in_pooled_memory_is_what_one_compress_call_makes():
    """seal() compresses into a pooled buffer: the object decodes to the same body and header
    as a pack made the old way, and its buffer goes back to the pool when closed."""
    rng = random.Random(2)
    blobs = [(pack.DATA, f"{i:064x}", rng.randbytes(3000) if i % 2 else b"z" * 3000) for i in range(900)]
    buf = pack.PackBuffer()
    for blob in blobs:
        buf.add(*blob)
    with buf.view() as raw:
        expected_body = bytes(raw)
    with pack.seal(buf, 1) as sealed:
        obj = bytes(sealed.view)
        memory = sealed._memory
    buf.release()
    assert pack.decode_body(obj, "k") == expected_body
    assert pack.read_header(obj, "k") == buf.entries
    assert memory in pack._pool  # closed: the buffer serves the next pack
    body, pooled = pack.decode_pooled(obj, "k")
    assert bytes(body) == expected_body and pooled is not None
    body.release()
    pack.give_back(pooled)


def test_an_incompressible_pack_too_big_for_a_pooled_buffer_is_sealed_in_its_own():
    buf = pack.PackBuffer()
    data = random.Random(3).randbytes(pack.BUFFER_SIZE - 1000)  # bound: a little over the buffer
    buf.add(pack.DATA, "a" * 64, data)
    with pack.seal(buf, 1) as sealed:
        assert len(sealed._memory) > pack.BUFFER_SIZE
        obj = bytes(sealed.view)
    buf.release()
    assert pack.decode_body(obj, "k") == data
    body, pooled = pack.decode_pooled(obj, "k")
    assert bytes(body) == data
    pack.give_back(pooled)


def test_a_damaged_or_cut_pack_decoded_into_a_pooled_buffer_is_an_integrity_error():
    obj, _ = pack.encode([(pack.DATA, "b" * 64, random.Random(4).randbytes(200_000) * 3)], 1)
    flipped = bytearray(obj)
    flipped[len(obj) // 3] ^= 0x10
    for bad in (bytes(flipped), obj[:len(obj) // 2], obj[:10], b"not a zstd frame at all"):
        with pytest.raises(IntegrityError, match="pack k: cannot decompress"):
            pack.decode_pooled(bad, "k")
    assert pack.decode_pooled(pack.encode([], 1)[0], "k") == (b"", None)


def test_a_restore_decompresses_its_packs_into_a_few_reused_buffers(tmp_path, monkeypatch):
    """Dozens of packs pass through the pool's buffers: a restore does not map fresh memory
    for each pack body (the cost this pool removes), and the restored bytes are right."""
    monkeypatch.setattr(native, "PACK_SIZE", 64 << 10)
    # A writer's batch within one pack, as with real 8 MiB packs of small files: a batch that
    # spans a dozen tiny packs holds them all until it ends (with 128: 10-12 mapped).
    monkeypatch.setattr(native, "BATCH_FILES", 4)
    src = _random_store(tmp_path / "src", seed=6, folders=8, suffix="subtree", sizes=(2000, 12000))
    repo, ref = _backup(tmp_path / "repo", src)
    packs = sum(1 for _ in (tmp_path / "repo" / "data").rglob("*") if _.is_file())
    made, taken = [], []
    real_memory, real_take = pack.private_memory, pack.take_buffer
    monkeypatch.setattr(pack, "private_memory", lambda size: made.append(size) or real_memory(size))
    monkeypatch.setattr(pack, "take_buffer", lambda: taken.append(1) or real_take())
    assert _restored(NativeRepository(LocalStore(tmp_path / "repo")), ref, tmp_path / "dest") == _tree(src)
    assert packs > 30
    assert len(taken) >= packs - 2  # each data pack is decompressed into one
    assert len(made) <= native.RESTORE_PACKS_AHEAD + native.UPLOADERS + 4, (len(made), packs)


def test_a_local_view_is_the_file_mapped_and_outlives_an_unlink(tmp_path):
    store = LocalStore(tmp_path)
    store.put("data/aa/x", b"0123456789")
    view = store.get_view("data/aa/x")
    (tmp_path / "data" / "aa" / "x").unlink()  # a prune while a restore decodes the pack
    assert bytes(view) == b"0123456789"
    store.put("data/aa/empty", b"")
    assert store.get_view("data/aa/empty") == b""
    from drtool.repo.objectstore import ObjectNotFound
    with pytest.raises(ObjectNotFound):
        store.get_view("data/aa/missing")


# ---- backup: page-cache reads and reader threads -----------------------------------------------

def _backup(repo_dir, src, progress=None):
    store = LocalStore(repo_dir)
    NativeRepository.init(store)
    repo = NativeRepository(store)
    session = repo.begin_backup()
    ref = session.store_tree(TreeSpec("store", src), None, progress or Progress("test"))
    session.commit({"test": True})
    return repo, ref


def _evict(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.skipif(native._NOWAIT is None, reason="RWF_NOWAIT is Linux-only: every file goes to the readers")
def test_cached_files_are_read_by_the_walker_and_the_rest_by_readers(tmp_path, monkeypatch):
    """Both walker paths: files the parent does not have (opened once, fstat for their stat)
    and changed files (stat first, then compared with the parent entry)."""
    src = _random_store(tmp_path / "src", seed=3, folders=6, suffix="tx", sizes=(200, 3000))
    files = sorted(src.rglob("*.tx"))
    evicted = files[::2]
    for p in evicted:
        _evict(p)
    fd = os.open(evicted[0], os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(10)], 0, native._NOWAIT)
        pytest.skip(f"{tmp_path}: this filesystem keeps evicted pages in memory (tmpfs?): nothing to test")
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
    outcomes = {"walker": 0, "readers": 0, "paths": set()}
    read_cached = native.NativeBackup._read_cached

    def spy(path, before):
        found = read_cached(path, before)
        if found is not None:
            outcomes["walker" if found[0] == "read" else "readers"] += 1
            outcomes["paths"].add("first seen" if before is None else "stat first")
        return found

    monkeypatch.setattr(native.NativeBackup, "_read_cached", staticmethod(spy))
    repo, ref = _backup(tmp_path / "repo", src)
    # Evicted pages cannot be read without waiting for the disk: those went to the readers.
    assert outcomes["readers"] >= len(evicted) // 2 and outcomes["walker"] >= 100, outcomes
    assert outcomes["paths"] == {"first seen"}
    assert _restored(repo, ref, tmp_path / "dest") == _tree(src)

    # Every file changed: the parent has them all, so each is stat-ed and compared first.
    for p in files:
        p.write_bytes(p.read_bytes() + b"+")
    for p in evicted:
        _evict(p)
    outcomes.update(walker=0, readers=0, paths=set())
    session = repo.begin_backup()
    ref2 = session.store_tree(TreeSpec("store", src), ref, Progress("test"))
    session.commit({"test": True})
    assert outcomes["readers"] >= len(evicted) // 2 and outcomes["walker"] >= 100, outcomes
    assert outcomes["paths"] == {"stat first"}
    assert _restored(repo, ref2, tmp_path / "dest2") == _tree(src)


def test_a_file_changed_under_the_walker_is_read_again(tmp_path, monkeypatch):
    """Changed between its stat and its read, a file is read again, whole: on the first-seen
    path (fstat, then the read) and on the path that stats first to compare with the parent."""
    src = tmp_path / "src"
    src.mkdir()
    victim = src / "a.tx"
    victim.write_bytes(b"first version")
    (src / "b.tx").write_bytes(b"other")
    real_preadv = os.preadv
    changed = []

    def change_then_preadv(fd, buffers, offset, *flags):
        if not changed and os.readlink(f"/proc/self/fd/{fd}").endswith("a.tx"):
            changed.append(fd)
            victim.write_bytes(b"second, longer version")
        return real_preadv(fd, buffers, offset, *flags)

    monkeypatch.setattr(os, "preadv", change_then_preadv)
    repo, ref = _backup(tmp_path / "repo", src)
    monkeypatch.setattr(os, "preadv", real_preadv)
    assert changed
    assert _restored(repo, ref, tmp_path / "dest")["a.tx"] == b"second, longer version"

    read_cached = native.NativeBackup._read_cached

    def change_then_read(path, before):
        if path.endswith("a.tx"):
            victim.write_bytes(b"third version, longer still")
        return read_cached(path, before)

    victim.write_bytes(b"changed since the parent")
    monkeypatch.setattr(native.NativeBackup, "_read_cached", staticmethod(change_then_read))
    session = repo.begin_backup()
    ref2 = session.store_tree(TreeSpec("store", src), ref, Progress("test"))
    session.commit({"test": True})
    assert _restored(repo, ref2, tmp_path / "dest2")["a.tx"] == b"third version, longer still"


# ---- restore: deduplicated tiny blobs -----------------------------------------------------------

class CountingStore(LocalStore):
    def __init__(self, root):
        super().__init__(root)
        self.data_gets = 0

    def get(self, key):
        if key.startswith("data/"):
            self.data_gets += 1
        return super().get(key)

    def get_view(self, key):
        if key.startswith("data/"):
            self.data_gets += 1
        return super().get_view(key)


def test_restore_fetches_each_pack_about_once_despite_deduplicated_tiny_files(tmp_path, monkeypatch):
    """Every folder holds a .dah file with the same height, stored once in the first pack:
    without the small-blob memory, each folder fetched that old pack again."""
    monkeypatch.setattr(native, "PACK_SIZE", 256 << 10)
    src = tmp_path / "src"
    rng = random.Random(5)
    for d in range(25):
        folder = src / f"{d:02x}"
        folder.mkdir(parents=True)
        (folder / "0.dah").write_bytes(b"1234")
        for i in range(100):  # ~3 packs a folder: the first folder's pack is long gone
            (folder / f"{i:02d}.subtree").write_bytes(rng.randbytes(8192))
    repo, ref = _backup(tmp_path / "repo", src)
    packs = sum(1 for _ in (tmp_path / "repo" / "data").rglob("*") if _.is_file())
    store = CountingStore(tmp_path / "repo")
    dest = tmp_path / "dest"
    dest.mkdir()
    NativeRepository(store).restore_tree(ref, dest, Progress("test"))
    assert _tree(dest) == _tree(src)
    assert packs <= store.data_gets <= packs + 8, (store.data_gets, packs)  # without it: about packs + 24
    assert hashlib.sha256((dest / "18" / "0.dah").read_bytes()).digest() == hashlib.sha256(b"1234").digest()


def test_a_stream_reads_back_the_same_as_views_or_copies(tmp_path):
    store = LocalStore(tmp_path / "repo")
    NativeRepository.init(store)
    repo = NativeRepository(store)
    session = repo.begin_backup()
    data = _DATA[:chunker.READ_SIZE + 3 * chunker.MAX_SIZE]
    ref = session.store_stream("s", iter([data[i:i + 999_999] for i in range(0, len(data), 999_999)]), Progress("test"))
    session.commit({"test": True})
    assert ref["size"] == len(data) and ref["sha256"] == hashlib.sha256(data).hexdigest()
    views = list(repo.read_stream(ref, views=True))
    assert all(isinstance(v, memoryview) for v in views) and b"".join(views) == data
    copies = list(repo.read_stream(ref))
    assert all(isinstance(c, bytes) for c in copies) and b"".join(copies) == data


def _read_ahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "drtool-read-ahead"]


def test_a_stream_checked_ahead_stops_with_its_consumer_and_raises_where_it_is_read(tmp_path):
    """Chunks are checked by a thread of their own ahead of the consumer: a consumer that
    stops early stops it; a damaged chunk is an IntegrityError in the consumer's thread, after
    the good chunks before it."""
    store = LocalStore(tmp_path / "repo")
    NativeRepository.init(store)
    repo = NativeRepository(store)
    session = repo.begin_backup()
    data = _DATA[:chunker.READ_SIZE + 3 * chunker.MAX_SIZE]
    ref = session.store_stream("s", iter([data]), Progress("test"))
    session.commit({"test": True})
    chunks = repo.read_stream(ref)
    first = next(chunks)
    assert data.startswith(first) and _read_ahead_threads()
    chunks.close()
    assert not _read_ahead_threads()

    damaged = {**ref, "sha256": "0" * 64}  # every chunk good, the whole not
    read = []
    with pytest.raises(IntegrityError, match="stream s: restored stream does not match"):
        for chunk in repo.read_stream(damaged):
            read.append(chunk)
    assert b"".join(read) == data
    assert not _read_ahead_threads()


def test_fast_level_packs_data_but_entropy_codes_trees(tmp_path):
    """At the default fast level (-1) a data pack of hex text is stored as it is (no entropy
    coding), while the tree packs (JSON full of hex ids) are sealed at level 1 and shrink."""
    src = tmp_path / "src"
    rng = random.Random(6)
    for d in range(4):
        (src / f"{d:02x}").mkdir(parents=True)
        for i in range(300):
            (src / f"{d:02x}" / f"{rng.randbytes(32).hex()}.tx").write_text(rng.randbytes(400).hex())
    store = LocalStore(tmp_path / "repo")
    NativeRepository.init(store)
    repo = NativeRepository(store)
    assert repo.level == -1
    session = repo.begin_backup()
    session.store_tree(TreeSpec("store", src), None, Progress("test"))
    session.commit({"test": True})
    ratios = {}
    for path in (tmp_path / "repo" / "data").rglob("*"):
        if path.is_file():
            obj = path.read_bytes()
            kinds = {e[0] for e in pack.read_header(obj, path.name)}
            ratios[kinds.pop() if len(kinds) == 1 else "mixed"] = len(obj) / len(pack.decode_body(obj, path.name))
    assert ratios["d"] > 0.9, ratios  # hex: only matches would shrink it, and it has none
    assert ratios["t"] < 0.45, ratios  # JSON of hex ids: 0.33 at level 1, 0.62 at -1
