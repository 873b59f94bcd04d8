"""Object stores: the seven calls every storage implements (restic's backend idea).

`open_store(url)` returns a LocalStore for file:// URLs (or plain paths) and an S3Store for
s3://bucket/prefix. Keys are '/'-separated relative names ("data/ab/abcd..."). Objects are
immutable once written; callers never rely on overwrite except for put().
"""

from __future__ import annotations

import abc
import io
import logging
import mmap
import os
import re
import secrets as _random
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator
from urllib.parse import unquote, urlsplit

from drtool.errors import ConfigError, ObjectNotFound, RepositoryError
from drtool.repo import directio
from drtool.secrets import redact, register

log = logging.getLogger(__name__)

MiB = 1024 * 1024
BODY_ATTEMPTS = 3  # a response body cut mid-read is asked for again (botocore retries only the request)


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch (LastModified on S3)


class ObjectStore(abc.ABC):
    """put, put_if_absent, get, get_range, list, delete, put_stream (+ stat, open_read, get_view)."""

    url: str  # display form, never holding a secret

    @abc.abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Write (or overwrite) an object atomically: readers see all of it or nothing.
        `data` is any bytes-like object (a sealed pack is a view of pooled memory)."""

    @abc.abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Write only if no object has that key. True if written, False if it existed."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """The whole object; raises ObjectNotFound."""

    @abc.abstractmethod
    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """`length` bytes from `offset` (fewer at the end); raises ObjectNotFound."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with prefix, in key order."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; deleting a missing key is not an error."""

    @abc.abstractmethod
    def put_stream(self, key: str, chunks: Iterable[bytes]) -> int:
        """Write an object from an iterable of byte chunks with bounded memory (multipart on S3).
        The object appears only when the iterable is exhausted; on error nothing is left behind.
        Returns the number of bytes written."""

    def get_view(self, key: str):
        """get(), as any bytes-like object (LocalStore: the file mapped read-only, no copy and no
        fresh memory to fill), valid while referenced: for a caller that drops it soon (a
        restore decompressing a pack)."""
        return self.get(key)

    def stat(self, key: str) -> ObjectInfo | None:
        for info in self.list(key):
            if info.key == key:
                return info
        return None

    def open_read(self, key: str) -> BinaryIO:
        """A readable stream of the object (default: the whole object in memory)."""
        import io

        return io.BytesIO(self.get(key))

    def close(self) -> None:
        pass

    # A forked child (repo/forked.py) may use its copy of this store: nothing in it is shared
    # with the parent once after_fork() has run (a rate limit would be, twice over).
    forkable = True

    def after_fork(self) -> None:
        """In a forked child: open its own connections, none of the parent's."""


def _check_key(key: str) -> str:
    """Keys are relative '/'-separated names with no empty, '.' or '..' segment."""
    if not isinstance(key, str) or not key:
        raise RepositoryError(f"invalid object key {key!r}: empty")
    parts = key.split("/")
    for part in parts:
        if part in ("", ".", "..") or "\\" in part or "\0" in part:
            raise RepositoryError(f"invalid object key {key!r}: bad segment {part!r}")
        if _TEMP_NAME.match(part):
            raise RepositoryError(f"invalid object key {key!r}: looks like a temporary file name")
    return key


def _check_range(key: str, offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise RepositoryError(f"invalid range for object {key!r}: offset {offset}, length {length}")


# ---------------------------------------------------------------------------------------------
# Local folder

# ".<name>.<12 hex>.tmp": recognisable so listings skip them and garbage collection can remove
# the ones a crashed writer left behind.
_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


class LocalStore(ObjectStore):
    """Objects as files under a root folder; key "a/b/c" is the file root/a/b/c."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().absolute()
        self.url = redact(self.root.as_uri())

    def __repr__(self) -> str:
        return f"LocalStore({self.url})"

    # -- helpers ------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*_check_key(key).split("/"))

    def _not_found(self, key: str) -> ObjectNotFound:
        return ObjectNotFound(f"object {key!r} not found in {self.url}")

    def _error(self, what: str, key: str, exc: OSError) -> RepositoryError:
        return RepositoryError(f"{self.url}: {what} {key!r} failed: {exc.strerror or exc}")

    def _new_temp(self, key: str, final: Path) -> Path:
        """A fresh temp-file name beside `final` (its folder made): written, then renamed."""
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._error("writing", key, exc) from exc
        return final.with_name(f".{final.name}.{_random.token_hex(6)}.tmp")

    def _write_temp(self, key: str, final: Path, chunks: Iterable[bytes]) -> tuple[Path, int]:
        """Write chunks to a fresh temp file beside `final`, fsynced; the caller renames it.
        The caller's own errors (from iterating `chunks`) pass through unchanged."""
        tmp = self._new_temp(key, final)
        try:
            f = open(tmp, "xb")
        except OSError as exc:
            raise self._error("writing", key, exc) from exc
        written = 0
        try:
            with f:
                for chunk in chunks:
                    try:
                        f.write(chunk)
                    except OSError as exc:
                        raise self._error("writing", key, exc) from exc
                    written += len(chunk)
                try:
                    f.flush()
                    os.fsync(f.fileno())
                except OSError as exc:
                    raise self._error("writing", key, exc) from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp, written

    def _write_direct(self, key: str, final: Path, data: bytes) -> Path:
        """_write_temp() for one large object (a pack), past the page cache (directio)."""
        tmp = self._new_temp(key, final)
        try:
            fd, direct = directio.open_new(tmp, os.O_WRONLY)
        except OSError as exc:
            raise self._error("writing", key, exc) from exc
        try:
            directio.write(fd, (data,), len(data), direct)
            os.fsync(fd)
        except BaseException as exc:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise self._error("writing", key, exc) from exc
            raise
        os.close(fd)
        return tmp

    def _rename_into_place(self, key: str, tmp: Path, final: Path) -> None:
        try:
            os.replace(tmp, final)
            self._fsync_dir(final.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise self._error("writing", key, exc) from exc

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        # Make the rename/link itself durable, not only the file's bytes.
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- the interface ------------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        final = self._path(key)
        if len(data) >= directio.MIN_SIZE:  # packs: not read back, so not through the page cache
            tmp = self._write_direct(key, final, data)
        else:
            tmp, _ = self._write_temp(key, final, (data,))
        self._rename_into_place(key, tmp, final)

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> int:
        final = self._path(key)
        tmp, written = self._write_temp(key, final, chunks)
        self._rename_into_place(key, tmp, final)
        return written

    def put_if_absent(self, key: str, data: bytes) -> bool:
        final = self._path(key)
        tmp, _ = self._write_temp(key, final, (data,))
        try:
            # link() never replaces an existing name, so of several writers (threads or
            # processes) exactly one succeeds, and readers never see a partial file.
            os.link(tmp, final)
            self._fsync_dir(final.parent)
        except FileExistsError:
            return False
        except OSError as exc:
            raise self._error("writing", key, exc) from exc
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise self._not_found(key) from None
        except OSError as exc:
            raise self._error("reading", key, exc) from exc

    def get_view(self, key: str):
        try:
            with open(self._path(key), "rb", buffering=0) as f:
                if os.fstat(f.fileno()).st_size == 0:
                    return b""  # mmap refuses an empty file
                # Packs are never rewritten in place (a new one is renamed over), and a mapping
                # outlives an unlink: the view stays what was read.
                return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise self._not_found(key) from None
        except OSError as exc:
            raise self._error("reading", key, exc) from exc

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        _check_range(key, offset, length)
        with self.open_read(key) as f:
            f.seek(offset)
            return f.read(length)

    def open_read(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            if path.is_dir():
                raise self._not_found(key)
            return open(path, "rb")
        except (FileNotFoundError, NotADirectoryError):
            raise self._not_found(key) from None
        except OSError as exc:
            raise self._error("reading", key, exc) from exc

    def stat(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not path.is_file():
            return None
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError as exc:
            raise self._error("deleting", key, exc) from exc

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # Walk lazily in key order: inside a folder, sort each entry by the key fragment it
        # stands for ("name" for a file, "name/" for a folder). No file name can start with
        # "name/", so this order is exactly the order of the full keys.
        folder, _, start = prefix.rpartition("/")
        if folder and any(part in ("", ".", "..") for part in folder.split("/")):
            return  # no key has such a prefix (and "..": never outside the root)
        base = self.root.joinpath(*folder.split("/")) if folder else self.root
        yield from self._walk(base, folder + "/" if folder else "", start)

    def _walk(self, folder: Path, key_prefix: str, name_prefix: str) -> Iterator[ObjectInfo]:
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise self._error("listing", key_prefix or "/", exc) from exc
        items = []
        for entry in entries:
            if not entry.name.startswith(name_prefix) or _TEMP_NAME.match(entry.name):
                continue
            is_dir = entry.is_dir(follow_symlinks=False)
            items.append((entry.name + "/" if is_dir else entry.name, entry, is_dir))
        items.sort(key=lambda item: item[0])
        for _, entry, is_dir in items:
            if is_dir:
                yield from self._walk(Path(entry.path), key_prefix + entry.name + "/", "")
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:  # deleted while we walked
                continue
            yield ObjectInfo(key_prefix + entry.name, st.st_size, st.st_mtime)

    def stale_temp_files(self, older_than_seconds: float) -> list[Path]:
        """Temp files (of interrupted writes) not modified for `older_than_seconds`."""
        cutoff = time.time() - older_than_seconds
        found = []
        for dirpath, _, filenames in os.walk(self.root):
            for name in filenames:
                if _TEMP_NAME.match(name):
                    path = Path(dirpath, name)
                    try:
                        if path.stat().st_mtime < cutoff:
                            found.append(path)
                    except FileNotFoundError:
                        pass
        return sorted(found)


# ---------------------------------------------------------------------------------------------
# S3


@dataclass(frozen=True)
class MultipartUpload:
    key: str  # relative to the store's prefix
    upload_id: str
    initiated: float  # seconds since the epoch


_S3_OPTIONS = {
    "part_size",  # bytes per multipart part (>= 5 MiB)
    "max_in_flight",  # parts uploading at once in put_stream
    "sse",  # "AES256" | "aws:kms"
    "sse_kms_key_id",
    "addressing_style",  # "path" | "virtual" | "auto"
    "max_attempts",
    "connect_timeout",
    "read_timeout",
    "profile",  # an AWS profile name (credentials still come from the AWS chain)
}
_S3_MIN_PART = 5 * MiB
_S3_MAX_PARTS = 10_000
# Grow the part size every this many parts so a stream of any size fits in 10,000 parts
# (16 MiB parts: 32 GiB at size x1, then x2, x4, ... ~1 TiB by part 10,000).
_PARTS_PER_SIZE_STEP = 2_000


class _ConditionalWritesUnsupported(Exception):
    pass


class S3Store(ObjectStore):
    """Objects under s3://bucket/prefix/. Thread-safe: one boto3 client shared by all callers."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        **options: Any,
    ):
        import boto3
        from botocore.config import Config

        unknown = sorted(set(options) - _S3_OPTIONS)
        if unknown:
            raise ConfigError(f"repository: unknown S3 option(s) {', '.join(unknown)}")
        if not bucket:
            raise ConfigError("repository url: no bucket in s3:// url")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.url = redact(f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}")
        self._where = self.url + (f" (endpoint {redact(endpoint_url)})" if endpoint_url else "")

        self.part_size = int(options.get("part_size", 16 * MiB))
        if self.part_size < _S3_MIN_PART:
            raise ConfigError(f"repository: part_size {self.part_size} is below S3's minimum of 5 MiB")
        self.max_in_flight = max(1, int(options.get("max_in_flight", 4)))

        self._extra_put: dict[str, str] = {}
        sse = options.get("sse")
        if sse is not None:
            if sse not in ("AES256", "aws:kms"):
                raise ConfigError(f"repository: sse must be 'AES256' or 'aws:kms', not {sse!r}")
            self._extra_put["ServerSideEncryption"] = sse
        if options.get("sse_kms_key_id"):
            if sse != "aws:kms":
                raise ConfigError("repository: sse_kms_key_id needs sse = 'aws:kms'")
            self._extra_put["SSEKMSKeyId"] = options["sse_kms_key_id"]

        addressing = options.get("addressing_style") or ("path" if endpoint_url else "auto")
        config = Config(
            retries={"mode": "standard", "max_attempts": int(options.get("max_attempts", 5))},
            # Connection failures are retried with a tiny backoff, so an unreachable endpoint
            # fails after about max_attempts * connect_timeout (25 s), never hangs.
            connect_timeout=float(options.get("connect_timeout", 5)),
            read_timeout=float(options.get("read_timeout", 60)),
            # put_stream's parts plus other threads of the caller (a pool of ~16 workers).
            max_pool_connections=max(20, self.max_in_flight + 16),
            s3={"addressing_style": addressing},
            # drtool hashes every object itself (SHA-256); botocore's default CRC trailers
            # are not understood by every S3-compatible server.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        try:
            session = boto3.session.Session(profile_name=options.get("profile"), region_name=region)
            # A forked child (after_fork) makes its own client the same way, in a session of its own.
            self._new_client = lambda session=None: (session or boto3.session.Session(
                profile_name=options.get("profile"), region_name=region)).client("s3", endpoint_url=endpoint_url, config=config)
            self._client = self._new_client(session)
            creds = session.get_credentials()
        except Exception as exc:  # bad profile, bad endpoint url, ...
            raise ConfigError(f"repository {self._where}: {redact(str(exc))}") from None
        if creds is not None:
            # Keep the secret parts out of every message drtool prints.
            frozen = creds.get_frozen_credentials()
            register(frozen.secret_key)
            register(frozen.token)
        self._conditional_writes = True
        self._fallback_logged = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Store({self._where})"

    # -- helpers ------------------------------------------------------------------------------

    def _full(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _relative(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    def _translate(self, exc: Exception, op: str, key: str | None) -> Exception:
        """botocore's exception -> a one-line drtool error naming bucket and key, no secret."""
        from botocore.exceptions import (
            ClientError,
            ConnectionError as BotoConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        what = f"{self.url}/{key}" if key else self.url
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", "?"))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if key and (code in ("NoSuchKey", "404", "NotFound") or (status == 404 and code != "NoSuchBucket")):
                return ObjectNotFound(f"object {key!r} not found in {self.url}")
            message = str(err.get("Message") or "").strip()
            detail = f"S3 error {code}" + (f" (HTTP {status})" if status else "")
            if message and message != code:
                detail += f": {message}"
            return RepositoryError(redact(f"{what}: {op} failed: {detail}"))
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return ConfigError(
                f"repository {self.url}: no usable AWS credentials (set AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role)"
            )
        if isinstance(exc, BotoConnectionError):
            return RepositoryError(redact(f"{what}: {op} failed: cannot reach S3 endpoint of {self._where}: {exc}"))
        return RepositoryError(redact(f"{what}: {op} failed: {type(exc).__name__}: {exc}"))

    def _call(self, op: str, key: str | None, method: str, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self._client, method)(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, op, key) from None

    # -- the interface ------------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        if not isinstance(data, (bytes, bytearray)):  # a view of pooled memory (pack.seal): botocore wants bytes
            data = bytes(data)
        self._call("put", key, "put_object", Bucket=self.bucket, Key=self._full(key), Body=data, **self._extra_put)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        full = self._full(key)
        if self._conditional_writes:
            try:
                return self._put_conditional(key, full, data)
            except _ConditionalWritesUnsupported:
                with self._lock:
                    self._conditional_writes = False
                    if not self._fallback_logged:
                        self._fallback_logged = True
                        log.warning(
                            "%s: the endpoint does not support conditional writes (If-None-Match); "
                            "put-if-absent falls back to check-then-write, which is not race-safe",
                            self._where,
                        )
        # Fallback: not atomic, but the best an endpoint without conditional writes allows.
        if self.stat(key) is not None:
            return False
        self.put(key, data)
        return True

    def _put_conditional(self, key: str, full: str, data: bytes) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        for attempt in range(5):
            try:
                self._client.put_object(
                    Bucket=self.bucket, Key=full, Body=data, IfNoneMatch="*", **self._extra_put
                )
                return True
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status == 412 or code == "PreconditionFailed":
                    return False
                if status == 409 or code == "ConditionalRequestConflict":
                    # Another conditional write to this key is in progress: ask again.
                    time.sleep(0.05 * (attempt + 1))
                    continue
                if status == 501 or code == "NotImplemented":
                    raise _ConditionalWritesUnsupported() from None
                raise self._translate(exc, "put-if-absent", key) from None
            except BotoCoreError as exc:
                raise self._translate(exc, "put-if-absent", key) from None
        raise RepositoryError(f"{self.url}/{key}: put-if-absent failed: conflicting writers kept racing")

    def get(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        for attempt in range(BODY_ATTEMPTS):
            resp = self._call("get", key, "get_object", Bucket=self.bucket, Key=self._full(key))
            try:
                with resp["Body"] as body:
                    return body.read()
            except (BotoCoreError, HTTPError, OSError) as exc:  # the connection broke mid-body: ask again
                if attempt == BODY_ATTEMPTS - 1:
                    raise self._translate(exc, "get", key) from None
                log.warning("%s/%s: connection lost while reading (%s); reading it again", self.url, key,
                            type(exc).__name__)
                time.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        _check_range(key, offset, length)
        if length == 0:
            if self.stat(key) is None:
                raise ObjectNotFound(f"object {key!r} not found in {self.url}")
            return b""
        from urllib3.exceptions import HTTPError

        try:
            for attempt in range(BODY_ATTEMPTS):
                resp = self._client.get_object(
                    Bucket=self.bucket, Key=self._full(key), Range=f"bytes={offset}-{offset + length - 1}"
                )
                try:
                    with resp["Body"] as body:
                        return body.read()
                except (HTTPError, OSError) as exc:  # cut mid-body: ask again
                    if attempt == BODY_ATTEMPTS - 1:
                        raise self._translate(exc, "get-range", key) from None
                    time.sleep(0.5 * (attempt + 1))
            raise AssertionError("unreachable")
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code == "InvalidRange" or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 416:
                return b""  # offset at or past the end of an existing object
            raise self._translate(exc, "get-range", key) from None
        except BotoCoreError as exc:
            raise self._translate(exc, "get-range", key) from None

    def open_read(self, key: str) -> BinaryIO:
        resp = self._call("get", key, "get_object", Bucket=self.bucket, Key=self._full(key))
        # A buffered file object over the HTTP body: read(n), readinto, iteration, `with`.
        return io.BufferedReader(_S3Body(self, key, resp["Body"]), buffer_size=1 * MiB)

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            resp = self._call("stat", key, "head_object", Bucket=self.bucket, Key=self._full(key))
        except ObjectNotFound:
            return None
        return ObjectInfo(key, int(resp["ContentLength"]), resp["LastModified"].timestamp())

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        from botocore.exceptions import BotoCoreError, ClientError

        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
                for obj in page.get("Contents", ()):
                    yield ObjectInfo(self._relative(obj["Key"]), int(obj["Size"]), obj["LastModified"].timestamp())
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, "list", prefix or None) from None

    def delete(self, key: str) -> None:
        # S3's DeleteObject succeeds for a missing key already.
        self._call("delete", key, "delete_object", Bucket=self.bucket, Key=self._full(key))

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> int:
        """Multipart upload with at most `max_in_flight` parts uploading and one filling, so
        memory stays near part_size * (max_in_flight + 1). Small data: a single PutObject."""
        full = self._full(key)
        it = iter(chunks)
        buf, total, exhausted = self._fill(it, self.part_size)
        if exhausted:
            self.put(key, bytes(buf))
            return total

        upload_id = self._call(
            "put-stream", key, "create_multipart_upload", Bucket=self.bucket, Key=full, **self._extra_put
        )["UploadId"]
        parts: dict[int, str] = {}
        pending: set[Future] = set()
        pool = ThreadPoolExecutor(max_workers=self.max_in_flight, thread_name_prefix="s3-part")
        try:
            number = 1
            while True:
                while len(pending) >= self.max_in_flight:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        fut.result()  # raise the first failure
                pending.add(pool.submit(self._upload_part, key, full, upload_id, number, buf, parts))
                buf = None  # the worker holds the only reference now
                if exhausted:
                    break
                number += 1
                if number > _S3_MAX_PARTS:
                    raise RepositoryError(f"{self.url}/{key}: put-stream failed: more than 10,000 parts")
                size = self.part_size * 2 ** ((number - 1) // _PARTS_PER_SIZE_STEP)
                buf, added, exhausted = self._fill(it, size)
                total += added
                if not buf:  # the stream ended exactly on a part boundary
                    break
            for fut in wait(pending).done:
                fut.result()
            pending = set()
            self._call(
                "put-stream",
                key,
                "complete_multipart_upload",
                Bucket=self.bucket,
                Key=full,
                UploadId=upload_id,
                MultipartUpload={"Parts": [{"PartNumber": n, "ETag": parts[n]} for n in sorted(parts)]},
            )
        except BaseException:
            for fut in pending:
                fut.cancel()
            wait(pending)
            self._abort(key, full, upload_id)
            raise
        finally:
            pool.shutdown(wait=True)
        return total

    @staticmethod
    def _fill(it: Iterator[bytes], size: int) -> tuple[bytearray, int, bool]:
        """Read chunks until `size` bytes are buffered (a part may end a chunk late: S3 only
        needs every part but the last to be >= 5 MiB). Returns (buffer, bytes, exhausted)."""
        buf = bytearray()
        for chunk in it:
            buf += chunk
            if len(buf) >= size:
                return buf, len(buf), False
        return buf, len(buf), True

    def _upload_part(self, key: str, full: str, upload_id: str, number: int, data: bytearray, parts: dict) -> None:
        resp = self._call(
            "put-stream", key, "upload_part",
            Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=data,
        )
        parts[number] = resp["ETag"]

    def _abort(self, key: str, full: str, upload_id: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
        except Exception as exc:  # the original error matters more; cleanup finds the rest
            log.warning("%s/%s: could not abort multipart upload %s: %s", self.url, key, upload_id, redact(str(exc)))

    def list_multipart_uploads(self) -> list[MultipartUpload]:
        """Unfinished multipart uploads under this store's prefix (orphans of crashed runs)."""
        from botocore.exceptions import BotoCoreError, ClientError

        found = []
        paginator = self._client.get_paginator("list_multipart_uploads")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else ""):
                for up in page.get("Uploads", ()):
                    found.append(MultipartUpload(self._relative(up["Key"]), up["UploadId"], up["Initiated"].timestamp()))
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, "list multipart uploads", None) from None
        return sorted(found, key=lambda u: (u.key, u.initiated))

    def abort_multipart_uploads(self, older_than_seconds: float) -> int:
        """Abort unfinished uploads started more than `older_than_seconds` ago; returns how many."""
        cutoff = time.time() - older_than_seconds
        aborted = 0
        for up in self.list_multipart_uploads():
            if up.initiated < cutoff:
                self._call(
                    "abort multipart upload", up.key, "abort_multipart_upload",
                    Bucket=self.bucket, Key=self._full(up.key), UploadId=up.upload_id,
                )
                aborted += 1
        return aborted

    def close(self) -> None:
        self._client.close()

    def after_fork(self) -> None:
        # The parent's client is kept, never used or closed: its pooled sockets are the parent's.
        self._parent_client, self._client = self._client, self._new_client()


class _S3Body(io.RawIOBase):
    """An S3 response body as a raw stream whose failures (a connection lost mid-read) are
    drtool errors naming the object."""

    def __init__(self, store: S3Store, key: str, body: Any):
        self._store, self._key, self._body = store, key, body

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        try:
            return self._body.readinto(b)
        except (BotoCoreError, HTTPError, OSError) as exc:
            raise self._store._translate(exc, "read", self._key) from None

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


# ---------------------------------------------------------------------------------------------

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):")


def open_store(
    url: str, *, endpoint_url: str | None = None, region: str | None = None, **s3_options: Any
) -> ObjectStore:
    """file:///abs/path or a plain path -> LocalStore; s3://bucket[/prefix] -> S3Store."""
    shown = redact(url)
    m = _SCHEME.match(url)
    if not m:
        if not url.strip():
            raise ConfigError("repository url: empty")
        return LocalStore(url)
    scheme = m.group(1).lower()
    parts = urlsplit(url)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"repository url: file url must be file:///absolute/path, not '{shown}'")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise ConfigError(f"repository url: file url must be file:///absolute/path, not '{shown}'")
        return LocalStore(path)
    if scheme == "s3":
        if "@" in parts.netloc:
            raise ConfigError(
                f"repository url: credentials do not belong in '{shown}' (use the AWS chain: environment, profile, role)"
            )
        if not parts.netloc:
            raise ConfigError(f"repository url: no bucket in '{shown}' (expected s3://bucket/prefix)")
        if parts.query or parts.fragment:
            raise ConfigError(f"repository url: unexpected '?' or '#' in '{shown}'")
        return S3Store(parts.netloc, unquote(parts.path), endpoint_url=endpoint_url, region=region, **s3_options)
    raise ConfigError(f"repository url: unknown scheme '{m.group(1)}' in '{shown}'")
