"""Object-store throughput against moto_server, compared with plain boto3.

    .venv/bin/python -m tests.bench.objectstore [--mib 256] [--part-mib 16] [--in-flight 4]

Prints MB/s for S3Store.put_stream vs boto3's upload_fileobj of the same bytes, and for
S3Store.get / open_read vs boto3's download_fileobj, with the ratios; and LocalStore for scale.
moto_server keeps objects in memory and is CPU-bound on this 2-core machine, so the absolute
figures say more about moto than about S3: the ratio is the figure to watch.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import tempfile
import time

MiB = 1024 * 1024


def chunks(data: bytes, size: int = 1 * MiB):
    view = memoryview(data)
    for i in range(0, len(data), size):
        yield bytes(view[i : i + size])


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_of(runs: int, fn) -> float:
    return min(timed(fn) for _ in range(runs))


def best_of_pair(runs: int, fn_a, fn_b) -> tuple[float, float]:
    a, b = [], []
    for _ in range(runs):
        a.append(timed(fn_a))
        b.append(timed(fn_b))
    return min(a), min(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="object size in MiB")
    parser.add_argument("--part-mib", type=int, default=16)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    from tests.support.s3 import TEST_AWS_ENV, run_moto_server

    os.environ.update(TEST_AWS_ENV)
    import boto3
    from boto3.s3.transfer import TransferConfig

    from drtool.repo.objectstore import LocalStore, S3Store

    data = os.urandom(args.mib * MiB)
    digest = hashlib.sha256(data).hexdigest()
    mb = len(data) / 1e6
    part = args.part_mib * MiB

    def rate(seconds: float) -> str:
        return f"{mb / seconds:8.1f} MB/s"

    with run_moto_server() as endpoint:
        raw = boto3.client("s3", endpoint_url=endpoint)
        raw.create_bucket(Bucket="drtool-bench")
        store = S3Store("drtool-bench", "bench", endpoint_url=endpoint, part_size=part, max_in_flight=args.in_flight)
        transfer = TransferConfig(multipart_chunksize=part, max_concurrency=args.in_flight)

        # Interleaved so drifting load on the machine hits both sides alike.
        put, ref_put = best_of_pair(
            args.runs,
            lambda: store.put_stream("obj", chunks(data)),
            lambda: raw.upload_fileobj(io.BytesIO(data), "drtool-bench", "ref", Config=transfer),
        )
        got: dict[str, bytes] = {}

        def read_stream():
            h = hashlib.sha256()
            with store.open_read("obj") as f:
                for block in iter(lambda: f.read(MiB), b""):
                    h.update(block)
            got["stream"] = h.hexdigest().encode()

        get, ref_get = best_of_pair(
            args.runs,
            lambda: got.__setitem__("get", store.get("obj")),
            lambda: raw.download_fileobj("drtool-bench", "ref", io.BytesIO(), Config=transfer),
        )
        stream = best_of(args.runs, read_stream)
        assert hashlib.sha256(got["get"]).hexdigest() == digest and got["stream"].decode() == digest
        store.close()

    with tempfile.TemporaryDirectory() as tmp:
        local = LocalStore(tmp)
        local_put = best_of(args.runs, lambda: local.put_stream("obj", chunks(data)))
        local_get = best_of(args.runs, lambda: local.get("obj"))

    print(f"object {args.mib} MiB, part {args.part_mib} MiB, {args.in_flight} in flight, best of {args.runs}")
    print(f"S3 put_stream          {rate(put)}   boto3 upload_fileobj   {rate(ref_put)}   ours/boto3 {ref_put / put:.2f}")
    print(f"S3 get                 {rate(get)}   boto3 download_fileobj {rate(ref_get)}   ours/boto3 {ref_get / get:.2f}")
    print(f"S3 open_read (+sha256) {rate(stream)}")
    print(f"local put_stream       {rate(local_put)}   local get {rate(local_get)}")


if __name__ == "__main__":
    main()
