"""The in-memory blob index against a plain dict model: every blob found where it was first
added, absent ids absent, across merges into the sorted arrays, and ids sharing a prefix."""

from __future__ import annotations

import hashlib
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drtool.repo import index as index_mod
from drtool.repo.index import BlobIndex, Location


def blob_id(n: int) -> str:
    return hashlib.sha256(n.to_bytes(8, "big")).hexdigest()


@pytest.fixture
def small_merges(monkeypatch):
    monkeypatch.setattr(index_mod, "MERGE_AT", 7)


packs_strategy = st.lists(
    st.lists(st.tuples(st.integers(0, 300), st.sampled_from("dt"), st.integers(0, 2**32 - 1),
                       st.integers(0, 2**32 - 1)), max_size=40),
    max_size=12)


@settings(max_examples=60, deadline=None)
@given(packs=packs_strategy)
def test_index_matches_a_dict(packs):
    index_mod.MERGE_AT, saved = 7, index_mod.MERGE_AT  # merges happen inside one example
    try:
        index, model = BlobIndex(), {}
        for p, entries in enumerate(packs):
            key = f"data/{p:02x}/{p:064x}"
            index.add_pack(key, 1000 + p, [[kind, blob_id(n), off, length] for n, kind, off, length in entries])
            for n, kind, off, length in entries:
                model.setdefault(blob_id(n), Location(key, off, length, kind))
        assert len(index) == len(model)
        for n in range(0, 320):
            assert index.get(blob_id(n)) == model.get(blob_id(n))
            assert (blob_id(n) in index) == (blob_id(n) in model)
        by_pack = index.blobs_of()
        assert sorted((b, p, o, ln, k) for p, blobs in by_pack.items() for b, o, ln, k in blobs) == \
            sorted((b, loc.pack, loc.offset, loc.length, loc.kind) for b, loc in model.items())
    finally:
        index_mod.MERGE_AT = saved


def test_ids_sharing_a_prefix_are_told_apart(small_merges):
    index = BlobIndex()
    same_prefix = ["ab" * 8 + f"{i:048x}" for i in range(20)]
    index.add_pack("data/p1", 10, [["d", b, i, 1] for i, b in enumerate(same_prefix[:10])])
    index.add_pack("data/p2", 10, [["d", b, 100 + i, 1] for i, b in enumerate(same_prefix)])
    for i, b in enumerate(same_prefix):
        assert index.get(b) == Location("data/p1" if i < 10 else "data/p2", i if i < 10 else 100 + i, 1, "d")
    assert index.get("ab" * 8 + "f" * 48) is None


def test_a_bad_id_is_refused_naming_the_pack():
    with pytest.raises(ValueError, match="data/p1"):
        BlobIndex().add_pack("data/p1", 10, [["d", "abcd", 0, 1]])


def test_readers_in_other_threads_see_every_added_blob_through_merges(small_merges):
    index, stop, missing = BlobIndex(), threading.Event(), []
    added: list[str] = []

    def reader():
        while not stop.is_set():
            for b in added[-50:]:
                if index.get(b) is None:
                    missing.append(b)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for p in range(200):
            ids = [blob_id(p * 10 + i) for i in range(10)]
            index.add_pack(f"data/{p}", 1, [["d", b, 0, 1] for b in ids])
            added.extend(ids)
    finally:
        stop.set()
        thread.join()
    assert missing == []
    assert all(index.get(b) is not None for b in added)
