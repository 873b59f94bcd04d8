"""Hostile input: a repository someone tampered with, malicious snapshots crafted with the
repository's own encoders (so every hash checks out), fuzzed manifests, trees and .asb files,
and configuration values full of shell metacharacters.

What must hold: restore never writes outside its target and reports the tampering (exit 1);
parsers raise drtool errors only; nothing in a config value ever reaches a shell."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from drtool.errors import DrtoolError, IntegrityError
from drtool.repo import pack
from drtool.repo.index import encode_index
from drtool.repo.objectstore import LocalStore
from drtool.teranode import sample
from tests.support.node import Node, write_node_config

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_ASB = Path("/work/shared/fixtures/aerospike/sample.asb")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def small_node(base: Path, **extra) -> Node:
    data_dir = base / "node"
    sample.build_sample_node(data_dir, seed=5, tx_files=30, subtrees=1, blocks=2, subtree_size_range=(2048, 8192))
    repo_url = f"file://{base / 'repo'}"
    cfg = write_node_config(base / "drtool.toml", data_dir, repo_url, extra=extra or None)
    return Node(base, data_dir, cfg, repo_url, dict(os.environ, PYTHONPATH=str(ROOT)))


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


class Crafter:
    """Writes packs, index objects and manifests into a local repository, as an attacker with
    write access to the bucket would: with drtool's own encoders, so every hash is right."""

    def __init__(self, repo_dir: Path):
        self.store = LocalStore(repo_dir)

    def blobs(self, blobs: list[tuple[str, bytes]]) -> list[str]:
        entries = [(kind, sha(data), data) for kind, data in blobs]
        obj, header = pack.encode(entries, 3)
        key = pack.pack_key(obj)
        self.store.put(key, obj)
        index_key, index_obj = encode_index([(key, len(obj), header)])
        self.store.put(index_key, index_obj)
        return [blob_id for _, blob_id, _ in entries]

    def tree(self, entries: list[dict]) -> str:
        data = json.dumps({"entries": entries}, sort_keys=True, separators=(",", ":")).encode()
        return self.blobs([(pack.TREE, data)])[0]

    def manifest(self, doc: dict) -> str:
        raw = json.dumps(doc, sort_keys=True, indent=1).encode()
        self.store.put(f"snapshots/{sha(raw)}", raw)
        return sha(raw)

    def base_manifest(self) -> dict:
        info = next(iter(self.store.list("snapshots/")))
        doc = json.loads(self.store.get(info.key))
        doc["time"] = "2099-01-01T00:00:00.000000+00:00"  # `latest` is the crafted one
        return doc


@pytest.fixture
def hostile(tmp_path):
    """A backed-up node, a crafter on its repository, and a restore target deep in tmp_path
    (so `..` paths land in tmp_path, and the folders they aim for exist)."""
    node = small_node(tmp_path)
    node.run("backup")
    target = tmp_path / "a" / "b" / "c" / "target"
    target.parent.mkdir(parents=True)
    for aim in ("etc", "outside"):
        (target.parent / aim).mkdir()
        (tmp_path / "a" / aim).mkdir()
    before = files_under(tmp_path)
    return node, Crafter(Path(node.repo_url[len("file://"):])), target, before


def assert_refused_and_contained(node: Node, target: Path, snap: str, before: set[str]) -> str:
    proc = node.run("restore", snap, "--target-dir", str(target), "--no-teranode-checks", check=None)
    after = files_under(node.dir)
    outside = {p for p in after - before if not (node.dir / p).is_relative_to(target)
               and not p.startswith(("state", "node/", "repo/"))}
    assert not outside, f"restore wrote outside its target: {sorted(outside)}"
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("drtool: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert not target.exists() or not [p for p in target.iterdir() if not p.name.startswith(".")], \
        "something was published"
    return errors[0]


# ---- tampered repository ---------------------------------------------------------------------

def test_flipped_bytes_in_a_pack(hostile):
    node, crafter, target, before = hostile
    pack_key = max(crafter.store.list("data/"), key=lambda i: i.size).key
    path = crafter.store.root / pack_key
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    for pos in range(100, len(data), len(data) // 5 or 1):
        data[pos] ^= 0xFF
    path.write_bytes(bytes(data))
    assert node.run("verify", "--read-data", json_out=True, check=1).doc["ok"] is False
    line = assert_refused_and_contained(node, target, "latest", before)
    assert "pack" in line or "blob" in line, line


def test_two_packs_swapped(hostile):
    node, crafter, target, before = hostile
    sample.add_files(node.data_dir, seed=9, count=20)
    node.run("backup")  # a second data pack
    packs = sorted(crafter.store.list("data/"), key=lambda i: i.size)
    a, b = crafter.store.root / packs[-1].key, crafter.store.root / packs[-2].key
    a.chmod(0o644)
    b.chmod(0o644)
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    findings = node.run("verify", "--read-data", json_out=True, check=1).doc["findings"]
    subjects = {f["subject"] for f in findings}
    assert packs[-1].key in subjects or packs[-2].key in subjects, findings
    assert_refused_and_contained(node, target, "latest", before)


def test_edited_manifest_is_ignored(hostile):
    node, crafter, _target, _before = hostile
    info = next(iter(crafter.store.list("snapshots/")))
    path = crafter.store.root / info.key
    path.chmod(0o644)
    path.write_text(path.read_text().replace('"test-node"', '"evil-node"'))
    proc = node.run("snapshots", json_out=True)
    assert proc.doc["snapshots"] == []
    assert "does not match its id" in proc.stderr


# ---- crafted malicious snapshots (hashes all correct) -------------------------------------------

HOSTILE_NAMES = ["../../etc/passwd", "..", ".", "", "a/b", "x\0y", "../outside/f", "/ABS/pwned"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
@pytest.mark.parametrize("kind", ["file", "dir", "symlink"])
def test_tree_with_hostile_entry_names(hostile, name, kind):
    node, crafter, target, before = hostile
    name = name.replace("/ABS", str(node.dir / "a" / "outside"))
    (payload,) = crafter.blobs([(pack.DATA, b"pwned")])
    inner = crafter.tree([{"name": "f", "type": "file", "size": 5, "mtime_ns": 0, "mode": 0o644, "content": [payload]}])
    entry = {"file": {"name": name, "type": "file", "size": 5, "mtime_ns": 0, "mode": 0o644, "content": [payload]},
             "dir": {"name": name, "type": "dir", "mode": 0o755, "mtime_ns": 0, "subtree": inner},
             "symlink": {"name": name, "type": "symlink", "target": "/etc"}}[kind]
    root = crafter.tree([{"name": "ok", "type": "file", "size": 5, "mtime_ns": 0, "mode": 0o644,
                          "content": [payload]}, entry])
    doc = crafter.base_manifest()
    doc["sources"]["blobstores"]["items"]["external"]["tree"] = root
    snap = crafter.manifest(doc)
    line = assert_refused_and_contained(node, target, snap[:12], before)
    assert "unsafe entry name" in line, line


def test_symlink_then_folder_of_the_same_name(hostile):
    """A link to a folder outside, then a folder entry of the same name whose file would be
    written through the link."""
    node, crafter, target, before = hostile
    outside = node.dir / "a" / "outside"
    (payload,) = crafter.blobs([(pack.DATA, b"pwned")])
    inner = crafter.tree([{"name": "f", "type": "file", "size": 5, "mtime_ns": 0, "mode": 0o644, "content": [payload]}])
    root = crafter.tree([{"name": "link", "type": "symlink", "target": str(outside)},
                         {"name": "link", "type": "dir", "mode": 0o755, "mtime_ns": 0, "subtree": inner},
                         {"name": "link", "type": "file", "size": 5, "mtime_ns": 0, "mode": 0o644, "content": [payload]}])
    doc = crafter.base_manifest()
    doc["sources"]["blobstores"]["items"]["external"]["tree"] = root
    assert_refused_and_contained(node, target, crafter.manifest(doc)[:12], before)
    assert list(outside.iterdir()) == []


def test_index_claiming_a_pack_outside_the_repository(hostile):
    node, crafter, target, before = hostile
    (tmp_secret := node.dir / "a" / "outside" / "secret").write_bytes(b"do not read")
    before = before | {"a/outside/secret"}
    blob = b"content of an unknown blob"
    header = [[pack.DATA, sha(blob), 0, len(blob)]]
    for bogus in ("data/../../../a/outside/secret", str(tmp_secret), "../a/outside/secret"):
        key, obj = encode_index([(bogus, 11, header)])
        crafter.store.put(key, obj)
    root = crafter.tree([{"name": "x", "type": "file", "size": len(blob), "mtime_ns": 0, "mode": 0o644,
                          "content": [sha(blob)]}])
    doc = crafter.base_manifest()
    doc["sources"]["blobstores"]["items"]["external"]["tree"] = root
    line = assert_refused_and_contained(node, target, crafter.manifest(doc)[:12], before)
    assert "invalid object key" in line or "not in any pack" in line, line


def test_manifest_blobstore_path_escaping_the_target(hostile):
    node, crafter, target, before = hostile
    doc = crafter.base_manifest()
    doc["sources"]["blobstores"]["items"]["external"]["path"] = "../../escape"
    assert_refused_and_contained(node, target, crafter.manifest(doc)[:12], before)


def test_manifest_files_name_escaping_the_target(hostile):
    node, crafter, target, before = hostile
    doc = crafter.base_manifest()
    items = doc["sources"]["files"]["items"]
    items["../../../escaped.key"] = items.pop(next(iter(items)))
    assert_refused_and_contained(node, target, crafter.manifest(doc)[:12], before)


# ---- fuzzing: manifests, trees, .asb -------------------------------------------------------------

_hostile_text = st.sampled_from(HOSTILE_NAMES + ["latest", "tree", "stream", "items", "path", "2099-01-01"]) | st.text(max_size=12)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | _hostile_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_hostile_text, inner, max_size=3),
    max_leaves=8)


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


def _set(doc, path, value):
    if not path:
        return value
    doc = copy.deepcopy(doc)
    here = doc
    for part in path[:-1]:
        here = here[part]
    here[path[-1]] = value
    return doc


@pytest.fixture(scope="module")
def fuzz_repo(tmp_path_factory):
    """One real backup to fuzz against (module scope: hypothesis runs many examples on it)."""
    base = tmp_path_factory.mktemp("fuzz")
    node = small_node(base)
    node.run("backup")
    crafter = Crafter(base / "repo")
    return node, crafter, crafter.base_manifest()


def _manifest_variants(base: dict):
    paths = list(_paths(base))
    mutated = st.builds(lambda path, value: _set(base, path, value), st.sampled_from(paths), _json)
    raw = st.one_of(st.binary(max_size=200), _json.map(lambda v: json.dumps(v).encode()),
                    mutated.map(lambda d: json.dumps(d, sort_keys=True, indent=1).encode()))
    return raw


def _exercise_manifest(crafter: Crafter, raw: bytes, sandbox: Path) -> None:
    """What the CLI does with a listed manifest: list it, verify it, restore it."""
    from drtool import restore as restore_mod
    from drtool.progress import Progress
    from drtool.repo.native import NativeRepository

    key = f"snapshots/{sha(raw)}"
    crafter.store.put(key, raw)
    try:
        repo = NativeRepository(crafter.store)
        for snap in repo.snapshots():
            snap.summary()
            repo.check([snap], 0.0, Progress("fuzz"))
            target = sandbox / "t" / "u" / "target"
            restore_mod.restore(None, repo, snap, target_dir=target, check_teranode=False)
            shutil.rmtree(sandbox / "t", ignore_errors=True)
    finally:
        crafter.store.delete(key)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_manifests_raise_drtool_errors_only(fuzz_repo, data):
    _node, crafter, base = fuzz_repo
    raw = data.draw(_manifest_variants(base))
    with tempfile.TemporaryDirectory() as sandbox:
        try:
            _exercise_manifest(crafter, raw, Path(sandbox))
        except DrtoolError:
            pass


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_manifests_never_write_outside_the_target(fuzz_repo, data):
    """Whatever a manifest holds (any exception allowed here), nothing lands outside the target."""
    _node, crafter, base = fuzz_repo
    doc = data.draw(st.builds(lambda path, value: _set(base, path, value),
                              st.sampled_from([p for p in _paths(base) if "path" not in p and "items" not in p[-1:]]),
                              _json))
    raw = json.dumps(doc, sort_keys=True, indent=1).encode()
    with tempfile.TemporaryDirectory() as sandbox:
        sandbox = Path(sandbox)
        try:
            _exercise_manifest(crafter, raw, sandbox)
        except Exception:
            pass
        stray = [p for p in sandbox.rglob("*") if not p.is_relative_to(sandbox / "t" / "u" / "target")
                 and p not in (sandbox / "t", sandbox / "t" / "u")]
        assert not stray, stray


_entry = st.fixed_dictionaries(
    {},
    optional={"name": _hostile_text, "type": st.sampled_from(["file", "dir", "symlink", "fifo"]) | _hostile_text,
              "size": st.integers(-1, 10) | _json, "mtime_ns": st.integers(-1, 2**63) | _json,
              "mode": st.sampled_from([0o644, 0o4755, 0o7777, -1, 2**40]) | _json, "content": st.just(["BLOB"]) | _json,
              "subtree": st.just("SUB") | _json, "target": _hostile_text, "sha256": _hostile_text})


def _restore_fuzzed_tree(crafter: Crafter, entries: list[dict], dest: Path) -> None:
    from drtool.progress import Progress
    from drtool.repo.native import NativeRepository

    payload = b"pwned"
    inner = json.dumps({"entries": [{"name": "f", "type": "file", "size": 5, "mtime_ns": 0, "mode": 0o644,
                                     "content": [sha(payload)]}]}, sort_keys=True).encode()
    fixed = json.loads(json.dumps(entries).replace('"BLOB"', json.dumps(sha(payload))).replace('"SUB"', json.dumps(sha(inner))))
    tree = json.dumps({"entries": fixed}, sort_keys=True).encode()
    crafter.blobs([(pack.DATA, payload), (pack.TREE, inner), (pack.TREE, tree)])
    repo = NativeRepository(crafter.store)
    repo.restore_tree({"tree": sha(tree)}, dest, Progress("fuzz"))


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(entries=st.lists(_entry, max_size=4))
def test_fuzzed_trees_never_write_outside_the_target(fuzz_repo, entries):
    _node, crafter, _base = fuzz_repo
    with tempfile.TemporaryDirectory() as sandbox:
        dest = Path(sandbox) / "x" / "dest"
        dest.mkdir(parents=True)
        try:
            _restore_fuzzed_tree(crafter, entries, dest)
        except Exception:
            pass
        stray = [p for p in Path(sandbox).rglob("*") if not p.is_relative_to(dest) and p != dest.parent]
        assert not stray, stray


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(entries=st.lists(_entry, max_size=4))
def test_fuzzed_trees_raise_drtool_errors_only(fuzz_repo, entries):
    _node, crafter, _base = fuzz_repo
    with tempfile.TemporaryDirectory() as sandbox:
        dest = Path(sandbox) / "dest"
        dest.mkdir()
        try:
            _restore_fuzzed_tree(crafter, entries, dest)
        except DrtoolError:
            pass


def test_a_tree_naming_an_entry_twice_is_an_integrity_error(fuzz_repo):
    """Found by the fuzzer above: a directory and a symlink both named "0" raised the second
    one's FileExistsError, not an error naming the tree."""
    _node, crafter, _base = fuzz_repo
    twice = [{"name": "0", "type": "dir", "subtree": "SUB", "mtime_ns": 0, "mode": 0o755},
             {"name": "0", "type": "symlink", "target": "../../etc/passwd"}]
    with tempfile.TemporaryDirectory() as sandbox:
        dest = Path(sandbox) / "dest"
        dest.mkdir()
        with pytest.raises(IntegrityError, match="tree /: entry name '0' appears twice"):
            _restore_fuzzed_tree(crafter, twice, dest)


def _asb_variants():
    base = SAMPLE_ASB.read_bytes() if SAMPLE_ASB.exists() else b"Version 3.1\n# namespace test\n# first-file\n"

    def mutate(ops):
        data = bytearray(base)
        for op, pos, value in ops:
            if not data:
                break
            pos %= len(data)
            if op == "flip":
                data[pos] ^= value or 1
            elif op == "cut":
                del data[pos:]
            elif op == "insert":
                data[pos:pos] = bytes([value]) * 3
            elif op == "delete":
                del data[pos:pos + value]
        return bytes(data)

    ops = st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert", "delete"]), st.integers(0, 1 << 20),
                             st.integers(0, 255)), min_size=1, max_size=4)
    return st.one_of(st.binary(max_size=300), ops.map(mutate),
                     st.lists(st.sampled_from([b"Version 3.1\n", b"# namespace test\n", b"# first-file\n",
                                               b"+ k S 3 abc\n", b"+ n test\n", b"+ d ", b"+ s set\n",
                                               b"+ g 1\n", b"+ t 0\n", b"+ b 2\n", b"- I x 1\n", b"- S s 3 abc\n",
                                               b"- B! b 4 AAAA\n", b"- L l 3 \x93\x01\x02\x03\n", b"\n",
                                               b"- Z z 1\n", b"- D d 1.5\n", b"* i test set idx N 1 b S\n"]),
                              max_size=14).map(b"".join))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=_asb_variants(), chunk=st.sampled_from([1, 7, 4096]))
def test_fuzzed_asb_raises_drtool_errors_only(data, chunk):
    from drtool.sources.asb import AsbReader, count_by_set

    try:
        list(AsbReader(io.BytesIO(data), chunk_size=chunk))
    except DrtoolError:
        pass
    try:
        count_by_set(io.BytesIO(data))
    except DrtoolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_fuzzed_msgpack_bins_raise_drtool_errors_only(data):
    from drtool.sources.asb import to_python

    for bin_type in ("L", "M"):
        try:
            to_python(bin_type, data)
        except DrtoolError:
            pass


# ---- shell metacharacters in configuration ----------------------------------------------------

def test_shell_metacharacters_in_config_never_reach_a_shell(tmp_path):
    # $C0..$C9 name canary files in tmp_path (no '/' in the values: they are also file names).
    canaries = {f"C{i}": str(tmp_path / f"pwned-{i}") for i in range(10)}
    evil = ["$(touch $C1)", "`touch $C2`", "; touch $C3", "| touch $C4 #", "&& touch $C5", "\n touch $C6"]
    base = tmp_path / "node dir $(touch $C0)"
    base.mkdir()
    node = small_node(base)
    node.env.update(canaries)
    weird = node.data_dir / "id $(touch $C7).key"
    weird.write_bytes(b"identity")
    cfg = node.config.read_text()
    cfg = cfg.replace('paths = ["p2p.key"]', f'paths = ["p2p.key", {json.dumps(weird.name)}]')
    node.config.write_text(cfg)
    node.run("backup")
    node.run("restore", "latest", "--target-dir", str(base / "restored `touch $C8`"))
    assert (base / "restored `touch $C8`" / weird.name).read_bytes() == b"identity"

    # Commands: every value passes as one argv element, never through sh -c.
    for i, value in enumerate(evil):
        extra = {"postgres": {"dsn": f"host=127.0.0.1 port=1 dbname=x{value}", "pg_dump": f"pg_dump{value}"},
                 "node": {"quiesce": "stop", "stop_command": [f"/bin/true{value}"],
                          "start_command": ["/bin/echo", value], "teranode_cli": ["/bin/echo", value]}}
        other = tmp_path / f"cfg{i}"
        other.mkdir()
        cfg_path = write_node_config(other / "drtool.toml", node.data_dir, f"file://{other / 'repo'}{value}",
                                     extra=extra)
        proc = subprocess.run([sys.executable, "-m", "drtool.cli", "--config", str(cfg_path), "backup"],
                              capture_output=True, text=True, env=node.env, timeout=120)
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr, proc.stderr
    assert not list(tmp_path.glob("pwned*")), "a config value reached a shell"
