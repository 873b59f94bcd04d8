"""The .asb reader's fast loop (AsbDecoder._common_records) against its general path.

The fast loop must give the same records, and for bad input the same error on the same
line, as _record alone -- including which of _record's branches (and so which message)
a line takes, which depends on the names seen before it.
"""

from __future__ import annotations

import io
import random

import pytest
from hypothesis import given, settings, strategies as st

from drtool.sources.asb import AsbDecoder, AsbHeader, AsbRecord, AsbUDF, AsbWriter


class GeneralOnly(AsbDecoder):
    """The decoder without its fast loop: every record through _record."""

    def _common_records(self, lines, i, n, out):
        return i, False


def decode(cls, data: bytes, chunk: int = 1 << 20):
    decoder = cls("t.asb")
    objs = []
    try:
        for pos in range(0, len(data), chunk):
            objs += decoder.feed(data[pos:pos + chunk])
        objs += decoder.close()
    except Exception as exc:  # the error is part of the behaviour compared
        return ("error", type(exc).__name__, str(exc))
    return ("ok", [repr(o) for o in objs], decoder.records)


def same_both_ways(data: bytes, chunks=(1, 7, 300, 1 << 20)):
    for chunk in chunks:
        fast, general = decode(AsbDecoder, data, chunk), decode(GeneralOnly, data, chunk)
        assert fast == general, (chunk, data[:2000])
    return fast


# -- random streams, valid and corrupted --------------------------------------------------------

# names first seen deep in a stream (after its head lines are known) matter most
NAMES = ["tx", "fee", "utxos", "a b", "x\\y", "*", "+x", "é"] + [f"b{k}" for k in range(12)]


def random_stream(r: random.Random) -> bytes:
    out = io.BytesIO()
    writer = AsbWriter(out, compact=r.random() < 0.1)
    legacy = r.random() < 0.1
    writer.write(AsbHeader("3.0" if legacy else "3.1", "utxo-store", True))
    for _ in range(r.randrange(1, 16)):
        if r.random() < 0.05:
            writer.write(AsbUDF("f", b"x\ny"))
        bins = []
        for _ in range(r.choice([0, 1, 3, 5])):
            name = r.choice([n for n in NAMES if " " not in n and "\\" not in n] if legacy else NAMES)
            t = r.choice(["I", "I", "B", "L", "B", "S", "D", "Z", "N", "X", "Y", "B!"])
            value = {"I": r.choice([0, 7, -5, 2**63 - 1]), "S": r.choice(["", "a b", "two\nlines"]),
                     "X": "x y", "D": 0.5, "Z": True, "N": None}.get(t, bytes(r.choice([0, 2, 3, 32])))
            bins.append((name, t, value))
        key_type = r.choice([None, "B", "B", "I", "S", "B!"])
        key = {None: None, "B": bytes(r.choice([4, 32])), "I": 5, "S": "k", "B!": b"k\ny"}[key_type]
        writer.write(AsbRecord(r.choice(["utxo-store"] * 4 + ["t"]), bytes(r.randrange(256) for _ in range(20)),
                               r.choice([None] + ["utxo"] * 4), key_type, key, r.choice([1, 1, 1, 65535]),
                               r.choice([0, 0, 0, 7]), bins))
    return out.getvalue()


def corrupt(r: random.Random, data: bytes) -> bytes:
    lines = data.split(b"\n")
    bin_lines = [j for j, line in enumerate(lines) if line[:2] == b"- "]
    for _ in range(r.choice([1, 2])):
        j = r.choice(bin_lines) if bin_lines and r.random() < 0.6 else r.randrange(len(lines))
        kind = r.randrange(6)
        if kind == 0:  # a value longer or shorter than its length, or a bad character
            lines[j] = r.choice([lines[j] + b"AAAA", lines[j][:-1], lines[j][:-4], lines[j] + b"!",
                                 lines[j] + b" 5", lines[j].rpartition(b" ")[0]])
        elif kind == 1 and lines[j]:
            pos = r.randrange(len(lines[j]))
            lines[j] = lines[j][:pos] + bytes([r.choice(b" \\0x9A=+-!")]) + lines[j][pos + 1:]
        elif kind == 2:
            lines.insert(j, lines[r.randrange(len(lines))])  # a line out of place
        elif kind == 3 and len(lines) > 1:
            del lines[j]
        elif kind == 4:
            lines[j] = lines[j].replace(b"+ t 0", b"+ t 4294967296").replace(b"+ g 1", b"+ g 70000")
        else:
            lines[j] = lines[j].replace(b"- I fee", b"- I fee 1_0").replace(b" 4 ", b" +4 ")
    return b"\n".join(lines)


@settings(max_examples=300, deadline=None)
@given(st.randoms(use_true_random=False), st.booleans())
def test_same_records_and_errors_as_the_general_path(r, bad):
    data = random_stream(r)
    if bad:
        data = corrupt(r, data)
    same_both_ways(data)


# -- corrupt lines in records that the fast loop takes ------------------------------------------

DIGEST = b"AAAAAAAAAAAAAAAAAAAAAAAAAAA="
GOOD_BINS = [b"- B tx 4 AAA=", b"- I fee 5", b"- L u 8 AAAAAAA="]


def record(bins, expiry=b"0") -> bytes:
    return (b"+ k B 4 AAA=\n+ n ns\n+ d " + DIGEST + b"\n+ s st\n+ g 1\n+ t " + expiry
            + b"\n+ b %d\n" % len(bins) + b"".join(b + b"\n" for b in bins))


@pytest.mark.parametrize("bad_bins,expiry,message", [
    ([b"- B tx 4 AAA=AAAA"] + GOOD_BINS[1:], b"0", "line 30: bin 'tx': length does not match the value"),
    ([b"- B tx 4 A!A="] + GOOD_BINS[1:], b"0", "line 30: malformed bin line: Only base64 data"),
    (GOOD_BINS[:1] + [b"- I fee 5x"] + GOOD_BINS[2:], b"0", "line 31: malformed bin line: invalid literal"),
    (GOOD_BINS[:2] + [b"- L u 8 AAAAAAA"], b"0", "line 32: bin 'u': length does not match the value"),
    (GOOD_BINS, b"4294967296", "line 28: expiry out of range"),
])
def test_corrupt_record_after_good_ones_names_its_line(bad_bins, expiry, message):
    data = b"Version 3.1\n# namespace ns\n" + record(GOOD_BINS) * 2 + record(bad_bins, expiry)
    result = same_both_ways(data)
    assert result[0] == "error" and result[2].startswith("t.asb: " + message)
    good = same_both_ways(b"Version 3.1\n# namespace ns\n" + record(GOOD_BINS) * 3)
    assert good[0] == "ok" and good[2] == 3


def test_after_the_names_cache_is_cleared():
    # Past 100,000 names the name cache starts over; the first 'tx' line after that takes
    # _record's slow branch, whose error message differs: the fast loop must too.
    data = [b"Version 3.1\n# namespace ns\n", record(GOOD_BINS[:2]) * 3]
    for k in range(0, 100_050, 50):
        data.append(record([b"- I n%d 1" % m for m in range(k, k + 50)]))
    data.append(record([b"- B tx 4 AAA=AA", b"- I fee 5"]))
    result = same_both_ways(b"".join(data), chunks=(1 << 16,))
    assert result[0] == "error" and "bin 'tx': 6 bytes where the length says 4" in result[2]


@pytest.mark.parametrize("bad_line,message", [
    (b"- B new 4 AAA=AA", "line 30: bin 'new': 6 bytes where the length says 4"),
    (b"- B new 4 A", "line 30: bin 'new': value does not end where its length 4 says"),
    (b"- B new 4", "line 30: missing length in bin 'new'"),
    (b"- B new", "line 30: bin 'new': missing value"),
    (b"- I new 5x", "line 30: malformed bin line: invalid literal"),
])
def test_corrupt_line_with_a_new_bin_name(bad_line, message):
    # _record takes its slow branch for a name not seen before: the fast loop must not
    # learn the name on a line that then fails (the message would be another branch's)
    data = b"Version 3.1\n# namespace ns\n" + record(GOOD_BINS) * 2 + record([bad_line] + GOOD_BINS[1:])
    result = same_both_ways(data)
    assert result[0] == "error" and result[2].startswith("t.asb: " + message), result
