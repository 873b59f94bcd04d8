"""A store of many files backed up and restored by two processes (repo/forked.py), and tiny
blobs that are not fetched twice: real folders, a real repository, real forked processes."""

from __future__ import annotations

import collections
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from drtool import errors
from drtool.errors import IntegrityError
from drtool.progress import Progress
from drtool.repo import forked, native, pack
from drtool.repo.base import TreeSpec
from drtool.repo.native import NativeRepository
from drtool.repo.objectstore import LocalStore
from drtool.throttle import ThrottledStore

HEIGHTS = [str(h).encode() for h in range(800, 830)]  # .dah contents, shared by many files


def _node_store(root, seed: int, dirs: int = 8, files: int = 20, big: str | None = None) -> None:
    """A Teranode-like store: hash-prefix folders of tx files with .dah sidecars, a nested
    folder and a symlink; `big` names a 3 MiB file (two blobs) in the last folder."""
    rng = random.Random(seed)
    for d in range(dirs):
        folder = root / f"{d:02x}"
        (folder / "nested").mkdir(parents=True)
        for f in range(files):
            name = rng.randbytes(32).hex()
            (folder / f"{name}.tx").write_bytes(rng.randbytes(rng.randrange(200, 2000)))
            (folder / f"{name}.tx.dah").write_bytes(rng.choice(HEIGHTS))
            os.chmod(folder / f"{name}.tx", 0o640)
            os.utime(folder / f"{name}.tx", ns=(1_700_000_000_000_000_000 + f, 1_700_000_000_000_000_000 + f))
        (folder / "nested" / "inner").write_bytes(rng.randbytes(100))
        (folder / "link").symlink_to("nested/inner")
    if big:
        (root / f"{dirs - 1:02x}" / big).write_bytes(rng.randbytes(3 << 20))


def _same_tree(a, b) -> None:
    names_a = sorted(str(p.relative_to(a)) for p in a.rglob("*"))
    assert names_a == sorted(str(p.relative_to(b)) for p in b.rglob("*"))
    for rel in names_a:
        pa, pb = a / rel, b / rel
        if pa.is_symlink():
            assert os.readlink(pb) == os.readlink(pa), rel
        elif pa.is_file():
            sa, sb = pa.stat(), pb.stat()
            assert pb.read_bytes() == pa.read_bytes(), rel
            assert (sb.st_mode & 0o7777, sb.st_mtime_ns) == (sa.st_mode & 0o7777, sa.st_mtime_ns), rel


def _back_up(store, trees: dict, parents: dict | None = None, stats: list | None = None) -> dict:
    NativeRepository.init(store)
    session = NativeRepository(store).begin_backup()
    refs = {name: session.store_tree(TreeSpec(name, root), (parents or {}).get(name), Progress("test"))
            for name, root in trees.items()}
    session.commit({"test": True})
    if stats is not None:
        stats.append(session.stats)
    return refs


@pytest.fixture
def forks(monkeypatch):
    """Every store is split, whatever its size; the pids of the forked halves are recorded."""
    pids = []
    real = forked.Forked.__init__

    def recording(self, *args, **kwargs):
        real(self, *args, **kwargs)
        pids.append(self.pid)

    monkeypatch.setattr(native, "FORK_MIN_FILES", 1)
    monkeypatch.setattr(forked.Forked, "__init__", recording)
    return pids


def test_a_store_split_between_two_processes_is_backed_up_as_one_would(tmp_path, forks, monkeypatch):
    """The same trees (content-addressed: the same root id), counts and statistics as a backup
    in one process; an incremental backup reads only the file that changed, in either half."""
    src = tmp_path / "src"
    _node_store(src, seed=4)
    stats = []
    ref = _back_up(LocalStore(tmp_path / "repo"), {"external": src}, stats=stats)["external"]
    assert len(forks) == 1 and forks[0] != os.getpid()
    with monkeypatch.context() as m:
        m.setattr(native, "FORKED_BACKUP", False)
        alone = _back_up(LocalStore(tmp_path / "repo-alone"), {"external": src}, stats=stats)["external"]
    assert ref == alone  # tree id, files, bytes, dirs
    counted = ("files_new", "files_unchanged", "files_vanished", "bytes_read")
    assert [getattr(stats[0], k) for k in counted] == [getattr(stats[1], k) for k in counted]
    # Packs are cut apart in two places, and .dah heights met in both halves are stored twice:
    # about as much is stored, not the same bytes.
    assert 0.9 * stats[1].bytes_stored < stats[0].bytes_stored < 1.1 * stats[1].bytes_stored
    assert stats[0].files_new == ref["files"] == 8 * (2 * 20 + 1)

    changed = sorted((src / "07").glob("*.tx"))[0]  # in the forked half
    changed.write_bytes(b"changed" * 50)
    again = _back_up(LocalStore(tmp_path / "repo"), {"external": src}, {"external": ref}, stats)["external"]
    assert len(forks) == 2
    assert (stats[2].files_new, stats[2].files_unchanged) == (1, ref["files"] - 1)
    assert stats[2].bytes_read == 350
    dest = tmp_path / "dest"
    dest.mkdir()
    NativeRepository(LocalStore(tmp_path / "repo")).restore_tree(again, dest, Progress("test"))
    _same_tree(src, dest)


def test_a_failure_in_the_forked_half_fails_the_backup_and_publishes_nothing(tmp_path, forks, monkeypatch):
    src = tmp_path / "src"
    _node_store(src, seed=5)
    store = LocalStore(tmp_path / "repo")
    NativeRepository.init(store)
    real = native.NativeBackup._read_small

    def failing(path, before):  # inherited by the child, which walks folder 07
        if "/07/" in path:
            raise native.SourceError(f"{path}: cannot read")
        return real(path, before)

    monkeypatch.setattr(native.NativeBackup, "_read_small", staticmethod(failing))
    monkeypatch.setattr(native.NativeBackup, "_read_cached", staticmethod(lambda path, before: None))
    session = NativeRepository(store).begin_backup()
    with pytest.raises(native.SourceError, match="/07/.*: cannot read"):
        session.store_tree(TreeSpec("external", src), None, Progress("test"))
    session.abort()
    assert len(forks) == 1
    with pytest.raises(ChildProcessError):  # reaped: nothing is left running
        os.waitpid(forks[0], os.WNOHANG)
    assert NativeRepository(store).snapshots() == []


def test_a_store_split_between_two_processes_is_restored_byte_identical(tmp_path, forks):
    src = tmp_path / "src"
    _node_store(src, seed=1)
    ref = _back_up(LocalStore(tmp_path / "repo"), {"external": src})["external"]
    forks.clear()  # the backup's
    dest = tmp_path / "dest"
    dest.mkdir()
    folders = []
    stats = NativeRepository(LocalStore(tmp_path / "repo")).restore_tree(ref, dest, Progress("test"), folders.append)
    assert len(forks) == 1 and forks[0] != os.getpid()
    _same_tree(src, dest)
    # Totals and finished folders come from both halves: the child's are passed on.
    assert stats.files == ref["files"] == 8 * (2 * 20 + 1)
    assert sorted(p.name for p in folders) == [f"{d:02x}" for d in range(8)]


def test_both_halves_back_up_to_and_restore_from_s3_on_their_own_connections(tmp_path, forks, object_store):
    """On S3 (moto_server) the child opens its own client: the parent's pooled connections
    are not shared between two processes."""
    src = tmp_path / "src"
    _node_store(src, seed=7)
    ref = _back_up(object_store, {"external": src})["external"]
    dest = tmp_path / "dest"
    dest.mkdir()
    NativeRepository(object_store).restore_tree(ref, dest, Progress("test"))
    assert len(forks) == 2  # the backup's and the restore's
    _same_tree(src, dest)


def test_a_damaged_file_in_the_forked_half_fails_the_restore_naming_it(tmp_path, forks, monkeypatch):
    src = tmp_path / "src"
    _node_store(src, seed=2, big="big.subtree")
    ref = _back_up(LocalStore(tmp_path / "repo"), {"external": src})["external"]
    forks.clear()  # the backup's
    walk = native.NativeRepository._walk_entries

    def tampered(self, entries, rel):  # inherited by the child: it restores folder 07
        for op, path, entry in walk(self, entries, rel):
            if path.endswith("big.subtree"):
                entry = {**entry, "sha256": "0" * 64}
            yield op, path, entry

    monkeypatch.setattr(native.NativeRepository, "_walk_entries", tampered)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(IntegrityError, match="07/big.subtree: restored content does not match"):
        NativeRepository(LocalStore(tmp_path / "repo")).restore_tree(ref, dest, Progress("test"))
    assert len(forks) == 1
    with pytest.raises(ChildProcessError):  # reaped: nothing is left running
        os.waitpid(forks[0], os.WNOHANG)


class _CountingStore(LocalStore):
    """A real local store that counts the objects read from it."""

    def __init__(self, root):
        super().__init__(root)
        self.reads = collections.Counter()

    def get(self, key):
        self.reads[key] += 1
        return super().get(key)

    def get_view(self, key):
        self.reads[key] += 1
        return super().get_view(key)


def test_tiny_blobs_met_again_in_a_later_store_are_not_fetched_again(tmp_path, monkeypatch):
    """Two stores whose .dah sidecars hold the same heights: the second store's are the first
    store's blobs, in its packs. Each pack is read once (a tiny-blob cache per store read the
    first store's packs again for each height)."""
    monkeypatch.setattr(native, "PACK_SIZE", 16 << 10)  # many packs
    monkeypatch.setattr(native, "FORKED_RESTORE", False)
    trees = {}
    for n, name in enumerate(("external", "subtreestore")):
        trees[name] = tmp_path / name
        _node_store(trees[name], seed=10 + n, dirs=4, files=40)
    refs = _back_up(LocalStore(tmp_path / "repo"), trees)
    store = _CountingStore(tmp_path / "repo")
    repo = NativeRepository(store)
    for name, ref in refs.items():
        (tmp_path / "dest" / name).mkdir(parents=True)
        repo.restore_tree(ref, tmp_path / "dest" / name, Progress("test"))
        _same_tree(trees[name], tmp_path / "dest" / name)
    packs = {k: n for k, n in store.reads.items()  # data packs (tree packs have a cache of their own)
             if k.startswith("data/") and pack.read_header(LocalStore(tmp_path / "repo").get(k), k)[0][0] == pack.DATA}
    assert len(packs) > 10
    assert max(packs.values()) == 1, {k[-8:]: n for k, n in packs.items() if n > 1}


def test_a_store_under_a_limit_is_not_split(tmp_path, forks):
    """A forked child would have its own copy of the limit: twice the rate asked for."""
    local = LocalStore(tmp_path / "repo")
    assert local.forkable and ThrottledStore(local).forkable
    for limit in ({"upload_rate": 1 << 30}, {"download_rate": 1 << 30}, {"max_concurrent": 8}):
        assert not ThrottledStore(local, **limit).forkable, limit
    src = tmp_path / "src"
    _node_store(src, seed=6, dirs=4, files=5)
    NativeRepository.init(local)
    session = NativeRepository(ThrottledStore(local, upload_rate=1 << 30)).begin_backup()
    ref = session.store_tree(TreeSpec("external", src), None, Progress("test"))
    session.commit({"test": True})
    dest = tmp_path / "dest"
    dest.mkdir()
    NativeRepository(ThrottledStore(local, download_rate=1 << 30)).restore_tree(ref, dest, Progress("test"))
    assert forks == []
    _same_tree(src, dest)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(c) for c in f.read().split()]
    return found


def test_the_forked_half_dies_with_a_restore_killed_9(tmp_path):
    """Linux kills it (PR_SET_PDEATHSIG), or its next progress message finds the pipe broken;
    either way it does not write on into a staging folder nobody will publish."""
    src = tmp_path / "src"
    _node_store(src, seed=3, dirs=8, files=1500)
    ref = _back_up(LocalStore(tmp_path / "repo"), {"external": src})["external"]
    dest = tmp_path / "dest"
    dest.mkdir()
    script = ("import json, pathlib, sys\n"
              "from drtool.progress import Progress\n"
              "from drtool.repo import native\n"
              "from drtool.repo.objectstore import LocalStore\n"
              "native.FORK_MIN_FILES = 1\n"
              "native.NativeRepository(LocalStore(sys.argv[2])).restore_tree(\n"
              "    json.loads(sys.argv[1]), pathlib.Path(sys.argv[3]), Progress('test'))\n")
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(ref), str(tmp_path / "repo"), str(dest)])
    try:
        deadline = time.monotonic() + 30
        while not (children := _children(proc.pid)) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        assert children, "the restore ended before it forked"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while any(_alive(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(c) for c in children), "the forked half outlived the restore"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_pack_buffers_are_not_shared_with_a_forked_child():
    """Pooled pack buffers and direct-write buffers are anonymous mmaps; mmap's default
    (MAP_SHARED) had the forked backup half fill the parent's buffers, corrupting its packs."""
    buf = pack.take_buffer()
    buf[:5] = b"mine!"
    pid = os.fork()
    if pid == 0:
        buf[:5] = b"child"
        os._exit(0)
    os.waitpid(pid, 0)
    assert buf[:5] == b"mine!"
    pack.give_back(buf)


class _Counted:
    """A progress that only counts: what the parent's Progress is given."""

    def __init__(self):
        self.files = self.nbytes = 0

    def advance(self, files=0, nbytes=0):
        self.files += files
        self.nbytes += nbytes


def test_a_forked_child_reports_its_progress_logs_folders_and_result(caplog):
    def work(progress, folder_done):
        logging.getLogger("drtool.test").warning("from the child, pid %d", os.getpid())
        progress.advance(files=3, nbytes=300)
        folder_done("/some/folder")
        return {"answer": 42}

    counted = _Counted()
    with caplog.at_level(logging.WARNING):
        child = forked.Forked(work, counted)
        assert child.wait() == {"answer": 42}
    assert (counted.files, counted.nbytes) == (3, 300)
    assert child.folders == ["/some/folder"]
    assert [r.getMessage() for r in caplog.records] == [f"from the child, pid {child.pid}"]


def test_a_forked_childs_error_is_raised_in_the_parent_as_its_own_kind():
    def fails(progress, folder_done):
        raise IntegrityError("pack data/ab/cd: damaged")

    with pytest.raises(IntegrityError, match="pack data/ab/cd: damaged"):
        forked.Forked(fails, _Counted()).wait()
    with pytest.raises(errors.RepositoryError, match="forked worker: ZeroDivisionError"):
        forked.Forked(lambda p, f: 1 / 0, _Counted()).wait()
    with pytest.raises(errors.RepositoryError, match="ended without finishing"):
        forked.Forked(lambda p, f: os._exit(3), _Counted()).wait()
