#!/usr/bin/env python3
"""A real child process standing in for absctl / asbackup / asrestore in tests.

Behaviour from the environment:
  FAKE_AS_ARGS_FILE   write {"argv": [...], "password_env": value or null, "tz": TZ} as JSON here
  FAKE_AS_MODE        ok (default) | fail | hang | slow-then-hang | fail-early
  FAKE_AS_RECORDS     records to write when backing up (default 10)
  FAKE_AS_BLOB        bytes per record blob (default 16)
  FAKE_AS_STDIN_FILE  restore: write "<bytes> <sha256>" of stdin here
Backup when "--output-file -" is given, restore when "--input-file -" is given.
"""

import base64
import hashlib
import json
import os
import sys
import time


def record(i: int, blob_size: int) -> bytes:
    digest = hashlib.sha1(b"rec-%d" % i).digest()
    blob = (hashlib.sha256(b"blob-%d" % i).digest() * (blob_size // 32 + 1))[:blob_size]
    enc = base64.b64encode(blob)
    lines = [b"+ k I %d" % i] if i % 2 == 0 else []
    lines += [b"+ n test", b"+ d " + base64.b64encode(digest), b"+ s fake",
              b"+ g 1", b"+ t 0", b"+ b 2", b"- I n %d" % i, b"- B blob %d %s" % (len(enc), enc)]
    return b"\n".join(lines) + b"\n"


def main() -> int:
    argv = sys.argv[1:]
    mode = os.environ.get("FAKE_AS_MODE", "ok")
    if os.environ.get("FAKE_AS_ARGS_FILE"):
        with open(os.environ["FAKE_AS_ARGS_FILE"], "w") as f:
            json.dump({"argv": argv, "password_env": os.environ.get("DRTOOL_AEROSPIKE_PASSWORD"),
                       "tz": os.environ.get("TZ")}, f)
    if "--version" in argv:
        print("asbackup version 4.5.8-fake")
        return 0
    out = sys.stdout.buffer
    if "--input-file" in argv:
        h = hashlib.sha256()
        n = 0
        if mode == "fail-early":
            sys.stdin.buffer.read(1000)
            sys.stderr.write("error: Invalid bytes label (line 13, col 3); password=hunter22\n")
            return 2
        while True:
            chunk = sys.stdin.buffer.read(65536)
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
        with open(os.environ["FAKE_AS_STDIN_FILE"], "w") as f:
            f.write(f"{n} {h.hexdigest()}")
        sys.stderr.write("restored records\n")
        return 0
    out.write(b"Version 3.1\n# namespace test\n# first-file\n")
    out.flush()
    if mode == "hang":
        time.sleep(3600)
    records = int(os.environ.get("FAKE_AS_RECORDS", "10"))
    blob = int(os.environ.get("FAKE_AS_BLOB", "16"))
    for i in range(records):
        out.write(record(i, blob))
    out.flush()
    if mode == "fail":
        for i in range(30):
            sys.stderr.write(f"progress line {i}\n")
        sys.stderr.write("error: Failed to connect to cluster; password=hunter22 rejected\n")
        return 3
    if mode == "slow-then-hang":
        time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
