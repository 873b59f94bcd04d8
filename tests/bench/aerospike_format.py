"""Benchmark: the .asb writer and reader on UTXO-like records, through zstd.

Run: .venv/bin/python tests/bench/aerospike_format.py [RECORDS]
Each record: a 32-byte bytes key (digest-addressed like Teranode's txid), bins: a 200-byte
blob, a list of three 32-byte byte strings (msgpack), a list of two ints and two ints.
Target: decode >= 200,000 records/s on one core (judged on the process's CPU time).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time

import zstandard

from drtool.sources.asb import AsbHeader, AsbReader, AsbRecord, AsbWriter, pack

TARGET_DECODE = 200_000


def make_records(n: int):
    blob = os.urandom(200)
    for i in range(n):
        txid = hashlib.sha256(i.to_bytes(8, "little")).digest()
        digest = hashlib.sha1(txid).digest()
        bins = [
            ("blockIDs", "L", pack([i // 1000, i // 1000 + 1])),
            ("fee", "I", i * 3 + 1),
            ("spentUtxos", "I", i % 7),
            ("tx", "B", blob[i % 50:] + blob[:i % 50]),
            ("utxos", "L", pack([txid, txid[::-1], digest + txid[:12]])),
        ]
        yield AsbRecord("utxo-store", digest, "utxo", "B", txid, 1, 0, bins)


class _Counting:
    def __init__(self, f):
        self.f, self.n = f, 0

    def write(self, data: bytes) -> None:
        self.n += len(data)
        self.f.write(data)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    records = list(make_records(n))  # built before timing: the writer is measured, not the generator
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.asb.zst")
        t0 = time.perf_counter()
        with open(path, "wb") as raw:
            with zstandard.ZstdCompressor(level=3).stream_writer(raw) as zf:
                counted = _Counting(zf)
                writer = AsbWriter(counted)
                writer.write(AsbHeader(namespace="utxo-store"))
                for rec in records:
                    writer.write_record(rec)
                text_bytes = counted.n
        enc = time.perf_counter() - t0
        stored = os.path.getsize(path)
        del records

        t0 = time.perf_counter()
        c0 = time.process_time()
        count = 0
        bins = 0
        with open(path, "rb") as raw:
            with zstandard.ZstdDecompressor().stream_reader(raw) as zf:
                for obj in AsbReader(zf):
                    if type(obj) is AsbRecord:
                        count += 1
                        bins += len(obj.bins)
        dec = time.perf_counter() - t0
        dec_cpu = time.process_time() - c0
        assert count == n and bins == 5 * n, (count, bins)

        t0 = time.perf_counter()
        with open(path, "rb") as raw:
            with zstandard.ZstdDecompressor().stream_reader(raw) as zf:
                counted = sum(1 for o in AsbReader(zf, decode_bins=False) if type(o) is AsbRecord)
        cnt = time.perf_counter() - t0
        assert counted == n

    mb = text_bytes / 1e6
    print(f"records: {n:,}  .asb text: {mb:,.1f} MB  zstd-3: {stored / 1e6:,.1f} MB")
    print(f"encode+zstd : {n / enc:>10,.0f} records/s  {mb / enc:7.1f} MB/s (text)")
    # The target is for one core: judged on CPU time (wall time suffers on a shared machine).
    print(f"zstd+decode : {n / dec:>10,.0f} records/s  {mb / dec:7.1f} MB/s (text)")
    print(f"  decode CPU time: {n / dec_cpu:,.0f} records/s  "
          f"target {TARGET_DECODE:,} -> {'OK' if n / dec_cpu >= TARGET_DECODE else 'BELOW TARGET'}")
    print(f"count only  : {n / cnt:>10,.0f} records/s  {mb / cnt:7.1f} MB/s (decode_bins=False)")


if __name__ == "__main__":
    main()
