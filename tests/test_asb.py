"""The .asb reader and writer: the real asbackup fixture, Aerospike's own test files,
property-based round trips for every bin and key type, and corrupt input."""

from __future__ import annotations

import io
import math
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from drtool.errors import SourceError
from drtool.sources.asb import (
    AsbError, AsbHeader, AsbIndex, AsbReader, AsbRecord, AsbUDF, AsbWriter, GeoJSON,
    KeyOrderedMap, count_by_set, format_float_absctl, pack, partition_id, to_python, unpack,
)

SAMPLE = Path("/work/shared/fixtures/aerospike/sample.asb")


def read_all(data: bytes, **kw) -> list:
    return list(AsbReader(io.BytesIO(data), **kw))


def write_all(objs, **kw) -> bytes:
    out = io.BytesIO()
    w = AsbWriter(out, **kw)
    for o in objs:
        w.write(o)
    return out.getvalue()


# -- the real asbackup file -------------------------------------------------------------------

@pytest.mark.skipif(not SAMPLE.exists(), reason="shared fixture missing")
def test_sample_round_trips_byte_for_byte():
    data = SAMPLE.read_bytes()
    objs = read_all(data)
    assert write_all(objs) == data
    for chunk_size in (1, 3, 64, 4096):  # records cut anywhere across chunks
        assert list(AsbReader(io.BytesIO(data), chunk_size=chunk_size)) == objs


@pytest.mark.skipif(not SAMPLE.exists(), reason="shared fixture missing")
def test_sample_contents_match_its_readme():
    reader = AsbReader(io.BytesIO(SAMPLE.read_bytes()))
    records = list(reader.records())
    assert reader.header == AsbHeader("3.1", "test", True)
    assert len(records) == 50
    assert sum(r.key_type is not None for r in records) == 33
    assert {r.key_type for r in records} == {None, "I", "S"}
    assert sum(r.key_type is None for r in records) == 17
    assert sum(r.expiry != 0 for r in records) == 8
    assert {r.set for r in records} == {"sample"} and {r.namespace for r in records} == {"test"}
    types = Counter(t for r in records for _, t, _ in r.bins)
    assert types == {"I": 50, "S": 50, "B": 50, "L": 50, "M": 50, "D": 10, "Z": 10, "G": 5}
    assert any("ü" in v for r in records for _, t, v in r.bins if t == "S")
    for r in records:  # lists and maps decode, and re-encode to the server's bytes
        for _, t, v in r.bins:
            if t in "LM":
                assert pack(unpack(v)) == v
    assert count_by_set(io.BytesIO(SAMPLE.read_bytes())) == {"sample": 50}


# -- Aerospike's own test files ---------------------------------------------------------------
# aerospike/aerospike-tools-backup, test/test_backup_file.asb at commit
# d2dbc64fada5a8aaa0a3ad077b296d3fdb5a7b29, and test/test_bad_backup_file.asb at commit
# 2eb0679e8680ac2aef33cecaa9b51e29b0d7de57 (which differs in its last line: bin type "x").
TOOLS_GOOD = (b"Version 3.1\n# namespace test\n# first-file\n+ k S 4 key1\n+ n test\n"
              b"+ d 7JEZLUt/jONdXXjTS8ply6qqyWA=\n+ s demo\n+ g 1\n+ t 428179113\n+ b 3\n"
              b"- I foo 123\n- S bar 3 abc\n- Z baz T\n")
TOOLS_BAD = TOOLS_GOOD.replace(b"- Z baz T\n", b"- x baz T\n")


def test_aerospike_tools_test_file():
    objs = read_all(TOOLS_GOOD)
    rec = objs[1]
    assert (rec.key_type, rec.key, rec.set, rec.expiry) == ("S", "key1", "demo", 428179113)
    assert rec.bins == [("foo", "I", 123), ("bar", "S", "abc"), ("baz", "Z", True)]
    assert write_all(objs) == TOOLS_GOOD


def test_aerospike_tools_bad_file_names_line_13():
    with pytest.raises(AsbError, match=r"line 13: unknown bin type 'x'"):
        read_all(TOOLS_BAD)


# -- corrupt input ----------------------------------------------------------------------------

@pytest.mark.parametrize("old,new,line", [
    (b"+ d 7JEZLUt/jONdXXjTS8ply6qqyWA=", b"+ d 7JEZLUt/jONdXXjTS8ply6q!yWA=", 6),
    (b"- I foo 123", b"- I foo 12x3", 11),
    (b"- S bar 3 abc", b"- S bar 9 abc", 12),
    (b"+ g 1", b"+ g 70000", 8),
    (b"+ t 428179113", b"+ q 428179113", 9),
    (b"Version 3.1", b"Version 9.9", 1),
])
def test_corrupt_line_is_named(old, new, line):
    with pytest.raises(AsbError, match=rf"line {line}:") as info:
        read_all(TOOLS_GOOD.replace(old, new), name="utxo.asb")
    assert str(info.value).startswith("utxo.asb: ")
    assert isinstance(info.value, SourceError)


def test_truncated_input_is_an_error():
    with pytest.raises(AsbError, match="unexpected end of input"):
        read_all(TOOLS_GOOD[:-30])
    with pytest.raises(AsbError, match="empty input"):
        read_all(b"")


def test_corrupt_line_deep_in_a_big_stream():
    rec = AsbRecord("ns", bytes(range(20)), "s", None, None, 1, 0, [("a", "I", 1), ("b", "B", b"xy")])
    data = write_all([AsbHeader("3.1", "ns")] + [rec] * 5000)
    lines = data.split(b"\n")
    lines[40_002] = b"- B b 4 !!!!"  # a bin line of a record in the middle
    with pytest.raises(AsbError, match="line 40003:"):
        read_all(b"\n".join(lines))


# -- globals ----------------------------------------------------------------------------------

def test_udf_and_index_lines_round_trip():
    objs = [AsbHeader("3.1", "utxo-store", True),
            AsbUDF("teranode v1.lua", b"function f(r)\n  return 1\nend\n\n"),
            AsbIndex("utxo-store", "utxo", "pruner_dah_index", "N", [("deleteAtHeight", "N")]),
            AsbIndex("utxo-store", "", "unmined", "L", [("a b", "S")], context="kgKB"),
            AsbIndex("utxo-store", "utxo", "e1", "N", [("x", "N")], expression="AbC="),
            AsbIndex("utxo-store", "utxo", "trail", "N", [("x", "B")], context="")]
    data = write_all(objs)
    assert b"* u L teranode\\ v1.lua 30 function" in data
    assert b"* i utxo-store utxo pruner_dah_index N 1 deleteAtHeight N\n" in data
    assert b"* i utxo-store  unmined L 1 a\\ b S kgKB\n" in data
    assert read_all(data) == objs
    assert write_all(read_all(data)) == data


# -- values -----------------------------------------------------------------------------------

def test_float_formats():
    assert write_all([AsbHeader()]) == b"Version 3.1\n# first-file\n"
    assert format_float_absctl(8.333333333333334) == b"8.333333333333334"
    assert format_float_absctl(1234567.0) == b"1.234567e+06"
    assert format_float_absctl(0.0001) == b"0.0001"
    assert format_float_absctl(0.00001) == b"1e-05"
    assert format_float_absctl(100.0) == b"100"


def test_digest_only_and_compact_forms():
    rec = AsbRecord("t", b"\x01" * 20, None, "B!", b"k\ney", 7, 99,
                    [("raw", "B!", b"a b\nc"), ("h", "Y", b"\x00\x01"), ("s", "S", "two\nlines "),
                     ("x", "X", "base64 string"), ("nil", "N", None), ("f", "D", -0.5)])
    data = write_all([AsbHeader("3.1", "t"), rec])
    assert b"+ k B! 4 k\ney\n" in data and b"- B! raw 5 a b\nc\n" in data and b"+ s" not in data
    back = read_all(data)[1]
    assert back == rec and back.partition == partition_id(rec.digest)
    compact = write_all([AsbHeader("3.1", "t"), AsbRecord("t", b"\x02" * 20, None, "B", b"kk", 1, 0,
                                                            [("b", "B", b"zz")])], compact=True)
    assert b"+ k B! 2 kk\n" in compact and b"- B! b 2 zz\n" in compact


def test_legacy_version_3_0_does_not_unescape():
    data = b"Version 3.0\n# namespace t\n+ n t\n+ d " + b"AAAAAAAAAAAAAAAAAAAAAAAAAAA=\n+ g 1\n+ t 0\n+ b 1\n- I a\\b 5\n"
    rec = read_all(data)[1]
    assert rec.bins == [("a\\b", "I", 5)]
    assert write_all(read_all(data)) == data


# -- properties -------------------------------------------------------------------------------

names = st.text(st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)),
                min_size=1, max_size=15)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
                    st.floats(allow_nan=False), st.text(max_size=20), st.binary(max_size=20))
nested = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5),
    st.dictionaries(st.one_of(st.text(max_size=8), st.integers(-1000, 1000)), inner, max_size=5)),
    max_leaves=20)

bin_values = st.one_of(
    st.tuples(st.just("N"), st.none()),
    st.tuples(st.just("Z"), st.booleans()),
    st.tuples(st.just("I"), st.integers(-(2**63), 2**63 - 1)),
    st.tuples(st.just("D"), st.floats()),
    st.tuples(st.sampled_from(["S", "X", "G"]), st.text()),
    st.tuples(st.sampled_from(list("BJCPRHEY") + ["B!", "Y!", "L!"]), st.binary(max_size=300)),
    st.tuples(st.just("L"), st.lists(nested, max_size=6).map(pack)),
    st.tuples(st.just("M"), st.dictionaries(st.text(max_size=8), nested, max_size=6).map(pack)),
)
keys = st.one_of(
    st.tuples(st.none(), st.none()),
    st.tuples(st.just("I"), st.integers(-(2**63), 2**63 - 1)),
    st.tuples(st.just("D"), st.floats(allow_nan=False)),
    st.tuples(st.sampled_from(["S", "X"]), st.text()),
    st.tuples(st.sampled_from(["B", "B!"]), st.binary(min_size=1, max_size=40)),
)
records = st.builds(
    lambda ns, digest, set_, key, gen, expiry, bins: AsbRecord(
        ns, digest, set_, key[0], key[1], gen, expiry, [(n, t, v) for n, (t, v) in bins]),
    names, st.binary(min_size=20, max_size=20), st.one_of(st.none(), names), keys,
    st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF),
    st.lists(st.tuples(names, bin_values), max_size=8))


@settings(max_examples=150, deadline=None)
@given(st.lists(records, max_size=6), st.integers(1, 200), st.sampled_from(["asbackup", "absctl"]))
def test_records_round_trip(recs, chunk_size, float_format):
    objs = [AsbHeader("3.1", "ns", True)] + recs
    data = write_all(objs, float_format=float_format)
    back = list(AsbReader(io.BytesIO(data), chunk_size=chunk_size))
    assert back == objs
    assert write_all(back, float_format=float_format) == data
    counted = list(AsbReader(io.BytesIO(data), decode_bins=False))
    assert [(r.digest, r.key) for r in counted[1:]] == [(r.digest, r.key) for r in recs]


@settings(max_examples=200, deadline=None)
@given(nested)
def test_msgpack_values_round_trip(value):
    def norm(v):  # lists used as map keys come back as tuples
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        return v
    assert norm(unpack(pack(value))) == norm(value)
    assert to_python("L", pack([value])) == [value] or isinstance(value, (dict, list, float))


def test_msgpack_special_values():
    geo = GeoJSON('{"type":"Point","coordinates":[1,2]}')
    back = unpack(pack([geo, b"\x00", "s", KeyOrderedMap(b=1, a=2)]))
    assert isinstance(back[0], GeoJSON) and back[1] == b"\x00" and back[2] == "s"
    assert isinstance(back[3], KeyOrderedMap) and back[3] == {"b": 1, "a": 2}
    assert not math.isnan(unpack(pack(1.5)))
