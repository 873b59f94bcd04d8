"""Aerospike's backup text format (`.asb`): a streaming reader and a writer.

Byte-compatible with `asbackup`/`asrestore` (aerospike-tools-backup: src/enc_text.c,
src/dec_text.c) and `absctl` (aerospike/backup-go: io/encoding/asb). The format:

    Version 3.1
    # namespace <escaped ns>
    # first-file
    * u L <escaped name> <length> <content>            a UDF (content may span lines)
    * i <ns> <set> <name> <N|L|K|V> <npaths> (<path> <S|N|G|B>)... [<context>]
    + k <I|D|S|X|B|B!> ...                             optional user key
    + n <escaped ns>
    + d <base64 20-byte digest>
    + s <escaped set>                                  optional
    + g <generation>
    + t <expiry: seconds since 2010-01-01 UTC, 0 = never>
    + b <bin count>
    - <type>[!] <escaped bin name> <value>             one line per bin

Bin types: N nil, Z bool (T/F), I int, D float (%.17g), S string and G GeoJSON
(`<length> <raw bytes>`), X string as base64, B plain bytes and the typed byte
variants J C P R H E, Y HyperLogLog, L list and M map (msgpack) -- all base64
`<encoded length> <base64>`, or raw `<length> <bytes>` in the compact `!` form.
Names (namespace, set, bin, UDF, index) escape backslash, space and newline with a
backslash (not in the legacy "Version 3.0").

The reader parses whole chunks of lines at a time (bytes.split, no per-byte work), so
it runs in constant memory and fast; a length-prefixed value holding newlines is
joined back from the following lines. Bins are kept as `(name, type, value)` tuples
so that what is read is written back byte for byte; `to_python`/`from_python`
convert values for the Aerospike client (lists and maps through `pack`/`unpack`,
Aerospike's msgpack flavour).
"""

from __future__ import annotations

import binascii
import gc
import struct
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, BinaryIO, Iterable, Iterator

from drtool.errors import SourceError

# Expiry values count seconds from the "citrusleaf epoch".
CITRUSLEAF_EPOCH = 1262304000  # 2010-01-01T00:00:00Z
DIGEST_SIZE = 20
CHUNK_SIZE = 1 << 20

BYTES_TYPES = "BJCPRHEYLM"  # base64 (or raw with "!") byte-valued bin types
BIN_TYPES = "NZIDSXG" + BYTES_TYPES
KEY_TYPES = ("I", "D", "S", "X", "B", "B!")
INDEX_TYPES = "NLKV"
INDEX_PATH_TYPES = "SNGB"


class AsbError(SourceError):
    """Malformed .asb input; the message names the stream and line number."""

    def __init__(self, message: str, line: int | None = None, name: str = "<stream>"):
        where = f"{name}: line {line}: " if line is not None else f"{name}: "
        super().__init__(where + message)
        self.line = line


@dataclass
class AsbHeader:
    version: str = "3.1"
    namespace: str | None = None
    first_file: bool = True


@dataclass
class AsbUDF:
    name: str
    content: bytes
    type: str = "L"  # Lua, the only kind Aerospike has


@dataclass
class AsbIndex:
    namespace: str
    set: str
    name: str
    index_type: str  # N bin, L list elements, K map keys, V map values
    paths: list[tuple[str, str]]  # (bin or path, S|N|G|B)
    context: str | None = None  # base64 CDT context; "" keeps a trailing space
    expression: str | None = None  # "* e" lines of absctl (expression indexes)


class AsbRecord:
    """One record. `bins` is a list of (name, type, value) in file order.

    key_type is None for a digest-only record, else one of KEY_TYPES.
    Values by bin type: N None, Z bool, I int, D float, S/X/G str, others bytes
    (a type with "!" suffix, e.g. "B!", is the compact raw form of the same bytes).
    """

    __slots__ = ("namespace", "digest", "set", "key_type", "key", "generation", "expiry", "bins")

    def __init__(self, namespace, digest, set=None, key_type=None, key=None,
                 generation=1, expiry=0, bins=None):
        self.namespace = namespace
        self.digest = digest
        self.set = set
        self.key_type = key_type
        self.key = key
        self.generation = generation
        self.expiry = expiry
        self.bins = bins if bins is not None else []

    def __eq__(self, other):
        if not isinstance(other, AsbRecord):
            return NotImplemented
        return all(_same(getattr(self, s), getattr(other, s)) for s in self.__slots__)

    def __repr__(self):
        return (f"AsbRecord(ns={self.namespace!r}, set={self.set!r}, digest={self.digest.hex()}, "
                f"key={self.key_type}:{self.key!r}, gen={self.generation}, expiry={self.expiry}, "
                f"bins={self.bins!r})")

    @property
    def partition(self) -> int:
        return partition_id(self.digest)


def _same(a, b) -> bool:
    # NaN floats are equal to themselves for round-trip purposes
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (a != a and b != b)
    return type(a) is type(b) and a == b


def partition_id(digest: bytes) -> int:
    """Aerospike's partition of a digest (4096 partitions, low 12 bits of the first 2 bytes)."""
    return (digest[0] | (digest[1] << 8)) & 0xFFF


# ---------------------------------------------------------------------------------------------
# escaping

def escape(text: str) -> bytes:
    """Escape a name the way the tools do (backslash before backslash and space).

    The tools would also escape a newline, but a name spanning lines cannot be told
    apart from a line break by a line-based reader; Aerospike names never hold one.
    """
    raw = text.encode("utf-8", "surrogateescape")
    if b"\n" in raw:
        raise ValueError(f"name {text!r} contains a newline")
    if b"\\" in raw or b" " in raw:
        raw = raw.replace(b"\\", b"\\\\").replace(b" ", b"\\ ")
    return raw


def _unescape(raw: bytes) -> bytes:
    if b"\\" not in raw:
        return raw
    out = bytearray()
    it = iter(raw)
    for c in it:
        if c == 92:
            c = next(it, None)
            if c is None:
                break
        out.append(c)
    return bytes(out)


def _split_escaped(raw: bytes, start: int) -> int:
    """Index of the first unescaped space in raw[start:], or len(raw)."""
    i, n = start, len(raw)
    while i < n:
        c = raw[i]
        if c == 92:
            i += 2
            continue
        if c == 32:
            return i
        i += 1
    return n


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


# ---------------------------------------------------------------------------------------------
# reader

class _NeedMore(Exception):
    """The current entry continues past the lines at hand."""


class AsbDecoder:
    """Push parser: feed() chunks of bytes, get back the parsed objects.

    With decode_bins=False, bin lines are only skipped (for counting records fast).
    """

    def __init__(self, name: str = "<stream>", decode_bins: bool = True):
        self.name = name
        self.decode_bins = decode_bins
        self._carry = b""
        self._line_no = 1  # line number of the first line of _carry
        self._state = 0  # 0: expect version, 1: meta lines, 2: body
        self._header = AsbHeader(version="", namespace=None, first_file=False)
        self._legacy = False
        self._names: dict[bytes, str] = {}  # raw escaped names and whole '+ n'/'+ s' lines
        self._ints: dict[bytes, int] = {}  # whole '+ g N' / '+ b N' lines
        self._sizes: dict[bytes, int] = {}  # length fields of base64 values
        # for _common_records: key line heads ('+ k B 44' -> 44), whole '+ t N' lines, and
        # heads of base64 and int bin lines ('- L utxos 144', '- I fee' -> (name, type, length))
        self._key_sizes: dict[bytes, int] = {}
        self._expiries: dict[bytes, int] = {}
        self._heads: dict[bytes, tuple[str, str, int | None]] = {}
        self.records = 0

    # -- public ----------------------------------------------------------------------------------
    def feed(self, data: bytes) -> list:
        if not data:
            return []
        lines = data.split(b"\n")
        if self._carry:  # = (carry + data).split(), without copying the chunk (10 % faster)
            carried = self._carry.split(b"\n")
            carried[-1] += lines[0]
            lines[0:1] = carried
        tail = lines.pop()  # incomplete last line (b"" when data ends with a newline)
        out: list = []
        # A chunk makes thousands of lists and tuples that outlive the call: the cyclic GC
        # would walk them again and again while they are made (about 10 % of the decode time).
        # It is paused for the chunk and walks them once afterwards. Nothing here is cyclic.
        gc_on = gc.isenabled()
        if gc_on:
            gc.disable()
        try:
            i = self._parse(lines, out)
        finally:
            if gc_on:
                gc.enable()
        if i < len(lines):
            rest = lines[i:]
            rest.append(tail)
            self._carry = b"\n".join(rest)
        else:
            self._carry = tail
        self._line_no += i
        return out

    def close(self) -> list:
        """End of input: anything left over is a truncated entry."""
        out: list = []
        if self._state < 2 and not self._carry:
            if self._state == 0:
                raise AsbError("empty input, expected 'Version 3.x'", 1, self.name)
            out.append(self._finish_header())
            return out
        if self._carry:
            raise AsbError("unexpected end of input (truncated entry or missing final newline)",
                           self._line_no, self.name)
        return out

    # -- parsing -----------------------------------------------------------------------------------
    def _error(self, lines_index: int, message: str) -> AsbError:
        return AsbError(message, self._line_no + lines_index, self.name)

    def _name(self, raw: bytes, cache_as: bytes | None = None) -> str:
        """Decode an escaped name; cached under `raw` (or a whole line, `cache_as`)."""
        key = raw if cache_as is None else cache_as
        name = self._names.get(key)
        if name is None:
            name = _text(raw if self._legacy else _unescape(raw))
            if len(self._names) > 100_000:
                self._names.clear()
                self._heads.clear()  # its entries stand for names in _names
            self._names[key] = name
        return name

    def _finish_header(self) -> AsbHeader:
        self._state = 2
        return self._header

    def _parse(self, lines: list[bytes], out: list) -> int:
        i, n = 0, len(lines)
        while i < n and self._state < 2:
            line = lines[i]
            if self._state == 0:
                if not line.startswith(b"Version ") or len(line) != 11:
                    raise self._error(i, f"expected 'Version 3.x', found {line[:40]!r}")
                self._header.version = line[8:].decode("ascii", "replace")
                if self._header.version not in ("3.0", "3.1"):
                    raise self._error(i, f"unsupported .asb version {self._header.version!r}")
                self._legacy = self._header.version == "3.0"
                self._state = 1
            elif line.startswith(b"# "):
                if line.startswith(b"# namespace "):
                    self._header.namespace = self._name(line[12:])
                elif line == b"# first-file":
                    self._header.first_file = True
                else:
                    raise self._error(i, f"unknown meta data line {line[:40]!r}")
            else:
                out.append(self._finish_header())
                break
            i += 1
        parse_record = self._record
        common = self._common_records if self.decode_bins else None
        while i < n:
            if common is not None:
                i, more = common(lines, i, n, out)
                if more or i >= n:
                    return i
            line = lines[i]
            start = i
            try:
                first = line[:1]
                if first == b"+":
                    rec, i = parse_record(lines, i, n)
                    out.append(rec)
                elif first == b"*":
                    obj, i = self._global(lines, i, n)
                    out.append(obj)
                else:
                    raise self._error(i, f"expected '+', '-' or '*' line, found {line[:40]!r}")
            except _NeedMore:
                return start
            except AsbError:
                raise
            except IndexError:
                return start
            except (ValueError, TypeError, UnicodeDecodeError, binascii.Error) as exc:
                raise self._locate(lines, start, n, exc) if first == b"+" else \
                    self._error(start, f"malformed line: {exc}") from None
        return i

    def _common_records(self, lines, i, n, out) -> tuple[int, bool]:
        """_record's work for a run of records, in one loop (the decoder's hot path).

        Returns (index, more): the first entry left to _parse (for _record or _global), and
        more=True if that is a record cut off by the end of the lines.

        Head lines ('+ k B', '+ n', '+ d', '+ s', '+ g', '+ t', '+ b') are taken only when they
        match the caches, which are not changed here: on any doubt the loop stops, and _record
        parses the record again, doing the same checks and naming the line at fault. Bin lines
        go as in _record (same checks, same errors, same cache updates -- which of _record's
        branches a line takes depends on the names seen before it, and so does its error
        message), with one shortcut: a base64 or int bin line is cut at its last space and its
        head ('- L utxos 144', '- I fee') looked up in self._heads, filled from lines _record's
        fast branch took. An entry stands for a name in self._names; both are cleared together.
        """
        names_get = self._names.get
        ints_get = self._ints.get
        expiries_get = self._expiries.get
        key_sizes_get = self._key_sizes.get
        heads = self._heads
        heads_get = heads.get
        a2b = _a2b
        emit = out.append
        new_record, record_class = object.__new__, AsbRecord  # without __init__'s call
        first = len(out)
        start = i
        try:
            while i < n:
                start = i
                # -- head: no side effects, so that _record can take over anywhere
                try:
                    line = lines[i]
                    tag = line[:4]
                    if tag == b"+ k ":
                        head, _, value = line.rpartition(b" ")
                        size = key_sizes_get(head)
                        if size is None:
                            size = self._learn_key(head)
                        if size != len(value):
                            break
                        key_type = "B"
                        key = a2b(value, strict_mode=True)
                        i += 1
                        line = lines[i]
                    elif tag == b"+ n ":
                        key_type = key = None
                    else:
                        break
                    namespace = names_get(line)
                    if namespace is None:
                        break
                    line = lines[i + 1]
                    if line[:4] != b"+ d ":
                        break
                    digest = a2b(line[4:], strict_mode=True)
                    if len(digest) != DIGEST_SIZE:
                        break
                    line = lines[i + 2]
                    i += 2
                    set_name = names_get(line)
                    if set_name is not None:
                        i += 1
                        line = lines[i]
                    elif line[:4] == b"+ s ":
                        break
                    generation = ints_get(line)
                    expiry = expiries_get(lines[i + 1])
                    if expiry is None:
                        expiry = self._learn_expiry(lines[i + 1])
                    count = ints_get(lines[i + 2])
                    if generation is None or expiry is None or count is None:
                        break
                    i += 3
                    if i + count > n:
                        break
                except Exception:  # noqa: BLE001 -- _record parses it again and reports it
                    break
                # -- bins: as in _record, but for the shortcut of known heads
                bins = []
                append = bins.append
                for line in lines[i:i + count]:
                    head, _, value = line.rpartition(b" ")
                    known = heads_get(head)
                    if known is None:
                        break
                    name, tstr, size = known
                    if size is None:
                        append((name, "I", int(value)))
                    elif size == len(value):
                        append((name, tstr, a2b(value, strict_mode=True)))
                    else:
                        raise self._error(i + len(bins),
                                          f"bin {name!r}: length does not match the value")
                left = count - len(bins)
                i += count - left
                i = self._general_bins(lines, i, n, left, append)  # the rest as in _record
                rec = new_record(record_class)
                rec.namespace = namespace
                rec.digest = digest
                rec.set = set_name
                rec.key_type = key_type
                rec.key = key
                rec.generation = generation
                rec.expiry = expiry
                rec.bins = bins
                emit(rec)
            else:
                start = i
        except (_NeedMore, IndexError):
            self.records += len(out) - first
            return start, True
        except AsbError:
            raise
        except (ValueError, TypeError, UnicodeDecodeError, binascii.Error) as exc:
            raise self._locate(lines, start, n, exc) from None
        self.records += len(out) - first
        return start, False

    def _learn_key(self, head: bytes) -> int | None:
        """The length in a key line's head '+ k B <length>' (cached), or None for other keys."""
        if head[:6] != b"+ k B " or not head[6:].isdigit():
            return None
        size = int(head[6:])
        if len(self._key_sizes) < 1000:
            self._key_sizes[head] = size
        return size

    def _learn_expiry(self, line: bytes) -> int | None:
        """The value of a valid '+ t <expiry>' line (cached), else None."""
        if line[:4] != b"+ t ":
            return None
        expiry = int(line[4:])
        if not 0 <= expiry <= 0xFFFFFFFF:
            return None
        if len(self._expiries) < 10_000:
            self._expiries[line] = expiry
        return expiry

    def _sized(self, lines, i, n, rest: bytes, what: str) -> tuple[bytes, int]:
        """Split '<length> <data>' where data may span lines; return (data, next line index)."""
        sp = rest.find(b" ")
        if sp <= 0:
            raise self._error(i, f"missing length in {what}")
        size = int(rest[:sp])
        data = rest[sp + 1:]
        if len(data) != size:
            if len(data) > size:
                raise self._error(i, f"{what}: {len(data)} bytes where the length says {size}")
            parts = [data]
            have = len(data)
            first = i
            while have < size:
                i += 1
                if i >= n:
                    raise _NeedMore
                nxt = lines[i]
                parts.append(nxt)
                have += 1 + len(nxt)
            data = b"\n".join(parts)
            if len(data) != size:
                raise self._error(first, f"{what}: value does not end where its length {size} says")
        return data, i + 1

    def _record(self, lines, i, n):
        # The fast path: no per-line bookkeeping; a ValueError is located by _locate().
        line = lines[i]
        key_type = key = None
        if line[:4] == b"+ k ":
            if line[:6] == b"+ k B ":  # the common bytes key (Teranode's txid)
                parts = line.split(b" ", 4)
                if len(parts) != 5 or int(parts[3]) != len(parts[4]):
                    raise self._error(i, "key: length does not match the value")
                key_type, key = "B", _a2b(parts[4], strict_mode=True)
                i += 1
            else:
                key_type, key, i = self._key(lines, i, n, line)
            line = lines[i]
        names_get = self._names.get
        namespace = names_get(line)
        if namespace is None:
            if line[:4] != b"+ n ":
                raise self._error(i, f"expected '+ n <namespace>', found {line[:40]!r}")
            namespace = self._name(line[4:], line)
        line = lines[i + 1]
        if line[:4] != b"+ d ":
            raise self._error(i + 1, f"expected '+ d <digest>', found {line[:40]!r}")
        digest = _a2b(line[4:], strict_mode=True)
        if len(digest) != DIGEST_SIZE:
            raise self._error(i + 1, f"digest is {len(digest)} bytes, expected {DIGEST_SIZE}")
        line = lines[i + 2]
        i += 2
        set_name = names_get(line)
        if set_name is not None:
            i += 1
            line = lines[i]
        elif line[:4] == b"+ s ":
            set_name = self._name(line[4:], line)
            i += 1
            line = lines[i]
        ints = self._ints
        generation = ints.get(line)
        if generation is None:
            generation = self._int_line(lines, i, n, b"+ g ", 0xFFFF)
        line = lines[i + 1]
        if line[:4] != b"+ t ":
            raise self._locate(lines, i + 1, n, ValueError("expected '+ t <expiry>'"))
        expiry = int(line[4:])
        if not 0 <= expiry <= 0xFFFFFFFF:
            raise self._error(i + 1, "expiry out of range")
        count = ints.get(lines[i + 2])
        if count is None:
            count = self._int_line(lines, i + 2, n, b"+ b ", 0xFFFF)
        i += 3
        if not self.decode_bins:
            i = self._skip_bins(lines, i, n, count)
            self.records += 1
            return AsbRecord(namespace, digest, set_name, key_type, key, generation, expiry, None), i
        if i + count > n:
            raise _NeedMore
        bins = []
        i = self._general_bins(lines, i, n, count, bins.append)
        self.records += 1
        return AsbRecord(namespace, digest, set_name, key_type, key, generation, expiry, bins), i

    def _general_bins(self, lines, i, n, left: int, append) -> int:
        """Parse `left` bin lines from lines[i] into append(); return the next line index.
        A base64 or int line taken by the fast branch has its head kept in self._heads for
        _common_records' shortcut."""
        names_get = self._names.get
        sizes_get = self._sizes.get
        b64_get = _B64_PREFIX.get
        heads = self._heads
        a2b = _a2b
        while left:
            left -= 1
            line = lines[i]
            tstr = b64_get(line[:4])
            if tstr is not None:
                parts = line.split(b" ", 4)
                name = names_get(parts[2])
                if name is not None:
                    if len(parts) != 5 or \
                            (sizes_get(parts[3]) or self._size(parts[3])) != len(parts[4]):
                        raise self._error(i, f"bin {name!r}: length does not match the value")
                    append((name, tstr, a2b(parts[4], strict_mode=True)))
                    if len(heads) < 10_000:  # parts[4] is base64: no spaces
                        heads[line[:-len(parts[4]) - 1]] = (name, tstr, len(parts[4]))
                    i += 1
                    continue
            elif line[:4] == b"- I ":
                parts = line.split(b" ")
                name = names_get(parts[2])
                if name is not None and len(parts) == 4:
                    append((name, "I", int(parts[3])))
                    if len(heads) < 10_000:
                        heads[b"- I " + parts[2]] = (name, "I", None)
                    i += 1
                    continue
            value, i2 = self._bin_slow(lines, i, n, line)
            append(value)
            if i2 > i + 1 and i2 + left > n:  # a value spanning lines
                raise _NeedMore
            i = i2
        return i

    def _size(self, raw: bytes) -> int:
        if not raw.isdigit():
            raise ValueError(f"bad length {raw[:20]!r}")
        value = int(raw)
        if len(self._sizes) < 10_000:
            self._sizes[raw] = value
        return value

    def _int_line(self, lines, i, n, tag: bytes, limit: int) -> int:
        line = lines[i]
        if line[:4] != tag:
            raise self._locate(lines, i, n, ValueError(f"expected '{tag.decode().strip()}' line"))
        value = int(line[4:])
        if not 0 <= value <= limit:
            raise self._error(i, f"'{tag.decode().strip()}' value {value} out of range")
        if len(self._ints) < 10_000:
            self._ints[line] = value
        return value

    def _locate(self, lines, i, n, exc) -> AsbError:
        """Walk a record that failed to parse line by line; an error naming the bad line."""
        start = i
        try:
            line = lines[i]
            if line[:4] == b"+ k ":
                try:
                    _, _, i = self._key(lines, i, n, line)
                except (ValueError, binascii.Error) as e:
                    return self._error(i, f"malformed key line: {e}")
            for tag, optional in ((b"+ n ", False), (b"+ d ", False), (b"+ s ", True),
                                  (b"+ g ", False), (b"+ t ", False), (b"+ b ", False)):
                line = lines[i]
                if line[:4] != tag:
                    if optional:
                        continue
                    return self._error(i, f"expected '{tag.decode().strip()}' line, found {line[:40]!r}")
                try:
                    if tag == b"+ d ":
                        if len(_a2b(line[4:], strict_mode=True)) != DIGEST_SIZE:
                            raise ValueError("digest is not 20 bytes")
                    elif tag in (b"+ g ", b"+ t ", b"+ b "):
                        count = int(line[4:])
                except (ValueError, binascii.Error) as e:
                    return self._error(i, f"malformed {tag.decode().strip()} line: {e}")
                i += 1
            for _ in range(count):
                line = lines[i]
                try:
                    _, i = self._bin_slow(lines, i, n, line)
                except (ValueError, binascii.Error, UnicodeDecodeError) as e:
                    return self._error(i, f"malformed bin line: {e}")
        except (IndexError, _NeedMore):
            pass
        return self._error(start, f"malformed record: {exc}")

    def _key(self, lines, i, n, line):
        t = line[4:5]
        if line[5:6] == b"!":
            if t != b"B" or line[6:7] != b" ":
                raise self._error(i, f"bad key line {line[:40]!r}")
            data, i = self._sized(lines, i, n, line[7:], "key")
            return "B!", data, i
        if line[5:6] != b" ":
            raise self._error(i, f"bad key line {line[:40]!r}")
        rest = line[6:]
        if t == b"B":
            data, i = self._sized(lines, i, n, rest, "key")
            return "B", _a2b(data, strict_mode=True), i
        if t == b"I":
            return "I", int(rest), i + 1
        if t == b"S":
            data, i = self._sized(lines, i, n, rest, "key")
            return "S", _text(data), i
        if t == b"D":
            return "D", float(rest), i + 1
        if t == b"X":
            data, i = self._sized(lines, i, n, rest, "key")
            return "X", _text(_a2b(data, strict_mode=True)), i
        raise self._error(i, f"unknown key type {t!r}")

    def _bin_slow(self, lines, i, n, line):
        t = line[2:3]
        ts = t.decode("ascii", "replace")
        if ts not in BIN_TYPES:
            raise self._error(i, f"unknown bin type {ts!r}")
        compact = line[3:4] == b"!"
        pos = 5 if compact else 4
        if line[pos - 1:pos] != b" ":
            raise self._error(i, f"bad bin line {line[:40]!r}")
        if self._legacy:
            end = line.find(b" ", pos)
            end = len(line) if end < 0 else end
        else:
            end = _split_escaped(line, pos)
        name = self._name(line[pos:end])
        if ts == "N":
            if end != len(line):
                raise self._error(i, f"bin {name!r}: text after a nil bin")
            return (name, "N", None), i + 1
        if end >= len(line):
            raise self._error(i, f"bin {name!r}: missing value")
        rest = line[end + 1:]
        if compact:
            if ts not in BYTES_TYPES:
                raise self._error(i, f"bin {name!r}: type {ts} has no compact form")
            data, i = self._sized(lines, i, n, rest, f"bin {name!r}")
            return (name, ts + "!", data), i
        if ts == "I":
            return (name, "I", int(rest)), i + 1
        if ts == "D":
            return (name, "D", float(rest)), i + 1
        if ts == "Z":
            if rest not in (b"T", b"F"):
                raise self._error(i, f"bin {name!r}: boolean must be T or F")
            return (name, "Z", rest == b"T"), i + 1
        data, i2 = self._sized(lines, i, n, rest, f"bin {name!r}")
        if ts == "S" or ts == "G":
            return (name, ts, _text(data)), i2
        value = binascii.a2b_base64(data, strict_mode=True)
        if ts == "X":
            return (name, "X", _text(value)), i2
        return (name, ts, value), i2

    def _skip_bins(self, lines, i, n, count):
        for _ in range(count):
            line = lines[i]
            if line[:2] != b"- ":
                raise self._error(i, f"expected bin line '- ...', found {line[:40]!r}")
            t = line[2:3]
            if t in b"SXG" or line[3:4] == b"!":  # values that may hold newlines
                _, i = self._bin_slow(lines, i, n, line)
            else:
                i += 1
        return i

    def _global(self, lines, i, n):
        line = lines[i]
        if line.startswith(b"* u "):
            # * u L <name> <length> <content>
            if line[4:6] != b"L ":
                raise self._error(i, f"unknown UDF type {line[4:5]!r}")
            end = _split_escaped(line, 6)
            name = _text(_unescape(line[6:end]))
            content, i = self._sized(lines, i, n, line[end + 1:], f"UDF {name!r}")
            return AsbUDF(name=name, content=content), i
        if line.startswith(b"* i ") or line.startswith(b"* e "):
            return self._index(line, i), i + 1
        raise self._error(i, f"unknown global line {line[:40]!r}")

    def _index(self, line: bytes, i: int) -> AsbIndex:
        tokens = []
        pos = 4
        while pos <= len(line):
            end = _split_escaped(line, pos)
            tokens.append(line[pos:end])
            pos = end + 1
        if len(tokens) < 7:
            raise self._error(i, "secondary index line has too few fields")
        ns, set_name, name = (_text(_unescape(t)) for t in tokens[:3])
        itype = tokens[3].decode("ascii", "replace")
        if itype not in INDEX_TYPES:
            raise self._error(i, f"unknown index type {itype!r}")
        npaths = int(tokens[4])
        if npaths < 1 or len(tokens) < 5 + 2 * npaths:
            raise self._error(i, "secondary index line: bad path count")
        paths = []
        for p in range(npaths):
            ptype = tokens[6 + 2 * p].decode("ascii", "replace")
            if ptype not in INDEX_PATH_TYPES:
                raise self._error(i, f"unknown index path type {ptype!r}")
            paths.append((_text(_unescape(tokens[5 + 2 * p])), ptype))
        extra = [_text(t) for t in tokens[5 + 2 * npaths:]]
        context = expression = None
        if line[2:3] == b"e":
            if not extra:
                raise self._error(i, "expression index without an expression")
            expression = extra.pop()
        if len(extra) > 1:
            raise self._error(i, "secondary index line has too many fields")
        if extra:
            context = extra[0]
        return AsbIndex(ns, set_name, name, itype, paths, context, expression)


_TYPE_STR = {t.encode(): t for t in BIN_TYPES}
_B64, _INT, _OTHER = object(), object(), object()
_FAST_KIND = {t.encode(): (_B64 if t in BYTES_TYPES else _INT if t == "I" else _OTHER)
              for t in BIN_TYPES}
_a2b = binascii.a2b_base64
_B64_PREFIX = {b"- " + t.encode() + b" ": t for t in BYTES_TYPES}


class AsbReader:
    """Iterate a .asb stream: AsbHeader first, then AsbUDF / AsbIndex / AsbRecord objects.

    `source` is a binary file object (anything with read()) or an iterable of bytes chunks.
    """

    def __init__(self, source: BinaryIO | Iterable[bytes], name: str | None = None,
                 decode_bins: bool = True, chunk_size: int = CHUNK_SIZE):
        self.source = source
        self.name = name or str(getattr(source, "name", "<stream>"))
        self.decoder = AsbDecoder(self.name, decode_bins)
        self.chunk_size = chunk_size
        self.header: AsbHeader | None = None

    def _chunks(self) -> Iterator[bytes]:
        read = getattr(self.source, "read", None)
        if read is None:
            yield from self.source  # type: ignore[misc]
            return
        while True:
            chunk = read(self.chunk_size)
            if not chunk:
                return
            yield chunk

    def __iter__(self) -> Iterator[Any]:
        decoder = self.decoder
        for chunk in self._chunks():
            yield from decoder.feed(chunk)
            if self.header is None and decoder._state == 2:
                self.header = decoder._header
        yield from decoder.close()
        self.header = decoder._header

    def records(self) -> Iterator[AsbRecord]:
        for obj in self:
            if isinstance(obj, AsbRecord):
                yield obj


# ---------------------------------------------------------------------------------------------
# writer

def format_float_asbackup(value: float) -> bytes:
    """asbackup's printf("%.17g")."""
    return b"%.17g" % value


def format_float_absctl(value: float) -> bytes:
    """absctl's Go strconv.FormatFloat(v, 'g', -1, 64): shortest round-trip digits."""
    if value != value:
        return b"NaN"
    if value in (float("inf"), float("-inf")):
        return b"+Inf" if value > 0 else b"-Inf"
    if value == 0:
        return b"-0" if struct.pack(">d", value)[0] & 0x80 else b"0"
    sign, digits, exp = Decimal(repr(value)).normalize().as_tuple()
    ds = "".join(map(str, digits))
    point = len(ds) + exp  # decimal point position
    x = point - 1  # scientific exponent
    if x < -4 or x >= 6:  # strconv 'g' with shortest precision switches to %e at 1e+06
        mant = ds[0] + ("." + ds[1:] if len(ds) > 1 else "")
        out = f"{mant}e{'-' if x < 0 else '+'}{abs(x):02d}"
    elif point <= 0:
        out = "0." + "0" * (-point) + ds
    elif point >= len(ds):
        out = ds + "0" * (point - len(ds))
    else:
        out = ds[:point] + "." + ds[point:]
    return (("-" if sign else "") + out).encode()


class AsbWriter:
    """Write .asb text: write(obj) for an AsbHeader, AsbUDF, AsbIndex or AsbRecord."""

    def __init__(self, fileobj: BinaryIO, float_format: str = "asbackup", compact: bool = False):
        self.fileobj = fileobj
        self._fmt_float = format_float_absctl if float_format == "absctl" else format_float_asbackup
        self.compact = compact  # write plain B bins / B keys in the raw "!" form
        self._legacy = False
        self._esc_cache: dict[str, bytes] = {}
        self.records = 0

    def _esc(self, text: str) -> bytes:
        raw = self._esc_cache.get(text)
        if raw is None:
            raw = text.encode("utf-8", "surrogateescape") if self._legacy else escape(text)
            if len(self._esc_cache) > 100_000:
                self._esc_cache.clear()
            self._esc_cache[text] = raw
        return raw

    def write(self, obj) -> None:
        if isinstance(obj, AsbRecord):
            self.write_record(obj)
        elif isinstance(obj, AsbHeader):
            self.write_header(obj)
        elif isinstance(obj, AsbUDF):
            self.write_udf(obj)
        elif isinstance(obj, AsbIndex):
            self.write_index(obj)
        else:
            raise TypeError(f"cannot write {type(obj).__name__} to .asb")

    def write_header(self, header: AsbHeader) -> None:
        self._legacy = header.version == "3.0"
        out = b"Version " + header.version.encode() + b"\n"
        if header.namespace is not None:
            out += b"# namespace " + self._esc(header.namespace) + b"\n"
        if header.first_file:
            out += b"# first-file\n"
        self.fileobj.write(out)

    def write_udf(self, udf: AsbUDF) -> None:
        self.fileobj.write(b"* u %s %s %d %s\n" % (udf.type.encode(), self._esc(udf.name),
                                                   len(udf.content), udf.content))

    def write_index(self, index: AsbIndex) -> None:
        out = [b"* e" if index.expression is not None else b"* i", self._esc(index.namespace),
               self._esc(index.set), self._esc(index.name), index.index_type.encode(),
               b"%d" % len(index.paths)]
        for path, ptype in index.paths:
            out += [self._esc(path), ptype.encode()]
        if index.context is not None:
            out.append(index.context.encode())
        if index.expression is not None:
            out.append(index.expression.encode())
        self.fileobj.write(b" ".join(out) + b"\n")

    def encode_record(self, rec: AsbRecord) -> bytes:
        out = []
        append = out.append
        kt = rec.key_type
        if kt is not None:
            key = rec.key
            if kt == "B" and self.compact:
                kt = "B!"
            if kt == "I":
                append(b"+ k I %d\n" % key)
            elif kt == "D":
                append(b"+ k D " + self._fmt_float(key) + b"\n")
            elif kt == "S":
                raw = key.encode("utf-8", "surrogateescape")
                append(b"+ k S %d %s\n" % (len(raw), raw))
            elif kt == "X":
                enc = binascii.b2a_base64(key.encode("utf-8", "surrogateescape"), newline=False)
                append(b"+ k X %d %s\n" % (len(enc), enc))
            elif kt == "B":
                enc = binascii.b2a_base64(key, newline=False)
                append(b"+ k B %d %s\n" % (len(enc), enc))
            elif kt == "B!":
                append(b"+ k B! %d %s\n" % (len(key), key))
            else:
                raise ValueError(f"unknown key type {kt!r}")
        append(b"+ n " + self._esc(rec.namespace) + b"\n+ d "
               + binascii.b2a_base64(rec.digest, newline=False) + b"\n")
        if rec.set:
            append(b"+ s " + self._esc(rec.set) + b"\n")
        append(b"+ g %d\n+ t %d\n+ b %d\n" % (rec.generation, rec.expiry, len(rec.bins)))
        esc = self._esc
        b2a = binascii.b2a_base64
        compact = self.compact
        for name, t, value in rec.bins:
            if t == "B" and compact:
                t = "B!"
            if t in _WRITE_B64:
                enc = b2a(value, newline=False)
                append(b"- %s %s %d %s\n" % (_WRITE_B64[t], esc(name), len(enc), enc))
            elif t == "I":
                append(b"- I %s %d\n" % (esc(name), value))
            elif t == "S" or t == "G":
                raw = value.encode("utf-8", "surrogateescape")
                append(b"- %s %s %d %s\n" % (t.encode(), esc(name), len(raw), raw))
            elif t == "D":
                append(b"- D " + esc(name) + b" " + self._fmt_float(value) + b"\n")
            elif t == "Z":
                append(b"- Z " + esc(name) + (b" T\n" if value else b" F\n"))
            elif t == "N":
                append(b"- N " + esc(name) + b"\n")
            elif t == "X":
                enc = b2a(value.encode("utf-8", "surrogateescape"), newline=False)
                append(b"- X %s %d %s\n" % (esc(name), len(enc), enc))
            elif len(t) == 2 and t[1] == "!" and t[0] in BYTES_TYPES:
                append(b"- %s %s %d %s\n" % (t.encode(), esc(name), len(value), value))
            else:
                raise ValueError(f"bin {name!r}: unknown bin type {t!r}")
        return b"".join(out)

    def write_record(self, rec: AsbRecord) -> None:
        self.fileobj.write(self.encode_record(rec))
        self.records += 1


_WRITE_B64 = {t: t.encode() for t in BYTES_TYPES}


# ---------------------------------------------------------------------------------------------
# values: .asb bins <-> Python values of the aerospike client

# Aerospike particle types used inside msgpack'd lists and maps (first byte of a str/bin).
_PT_STRING, _PT_BLOB, _PT_GEOJSON = 3, 4, 23


class GeoJSON(str):
    """A GeoJSON string value (bin type G, particle 23 inside lists/maps)."""


class HLL(bytes):
    """A HyperLogLog value (bin type Y)."""


class KeyOrderedMap(dict):
    """A map Aerospike keeps in key order (msgpack ext flag header)."""


def pack(value: Any) -> bytes:
    """Encode a Python value as Aerospike msgpack (the body of an L or M bin)."""
    out = bytearray()
    _pack(value, out)
    return bytes(out)


def _pack_raw(ptype: int, data: bytes, out: bytearray) -> None:
    n = len(data) + 1
    if n < 32:
        out.append(0xA0 | n)
    elif n < 256:
        out += b"\xd9" + bytes([n])
    elif n < 65536:
        out += b"\xda" + struct.pack(">H", n)
    else:
        out += b"\xdb" + struct.pack(">I", n)
    out.append(ptype)
    out += data


def _pack(v: Any, out: bytearray) -> None:
    if v is None:
        out.append(0xC0)
    elif v is True:
        out.append(0xC3)
    elif v is False:
        out.append(0xC2)
    elif isinstance(v, int):
        if 0 <= v < 128:
            out.append(v)
        elif -32 <= v < 0:
            out.append(v & 0xFF)
        elif 0 <= v < 256:
            out += b"\xcc" + bytes([v])
        elif 0 <= v < 65536:
            out += b"\xcd" + struct.pack(">H", v)
        elif 0 <= v < 1 << 32:
            out += b"\xce" + struct.pack(">I", v)
        elif 0 <= v < 1 << 64:
            out += b"\xcf" + struct.pack(">Q", v)
        elif -128 <= v:
            out += b"\xd0" + struct.pack(">b", v)
        elif -32768 <= v:
            out += b"\xd1" + struct.pack(">h", v)
        elif -(1 << 31) <= v:
            out += b"\xd2" + struct.pack(">i", v)
        elif -(1 << 63) <= v:
            out += b"\xd3" + struct.pack(">q", v)
        else:
            raise ValueError(f"integer out of range: {v}")
    elif isinstance(v, float):
        out += b"\xcb" + struct.pack(">d", v)
    elif isinstance(v, GeoJSON):
        _pack_raw(_PT_GEOJSON, v.encode("utf-8", "surrogateescape"), out)
    elif isinstance(v, str):
        _pack_raw(_PT_STRING, v.encode("utf-8", "surrogateescape"), out)
    elif isinstance(v, (bytes, bytearray)):
        _pack_raw(_PT_BLOB, bytes(v), out)
    elif isinstance(v, (list, tuple)):
        n = len(v)
        if n < 16:
            out.append(0x90 | n)
        elif n < 65536:
            out += b"\xdc" + struct.pack(">H", n)
        else:
            out += b"\xdd" + struct.pack(">I", n)
        for item in v:
            _pack(item, out)
    elif isinstance(v, dict):
        ordered = isinstance(v, KeyOrderedMap) or type(v).__name__ == "KeyOrderedDict"
        n = len(v) + (1 if ordered else 0)
        if n < 16:
            out.append(0x80 | n)
        elif n < 65536:
            out += b"\xde" + struct.pack(">H", n)
        else:
            out += b"\xdf" + struct.pack(">I", n)
        if ordered:
            out += b"\xc7\x00\x01\xc0"  # ext(0) flags=1 (key ordered) -> nil
        for key, item in v.items():
            _pack(key, out)
            _pack(item, out)
    else:
        raise ValueError(f"cannot encode {type(v).__name__} for Aerospike")


def unpack(data: bytes) -> Any:
    """Decode Aerospike msgpack (an L or M bin) into Python values; AsbError when malformed."""
    try:
        value, pos = _unpack(memoryview(data), 0)
    except (IndexError, ValueError, TypeError, struct.error, UnicodeDecodeError) as exc:
        raise AsbError(f"malformed msgpack in a list or map bin: {exc or type(exc).__name__}") from None
    if pos != len(data):
        raise AsbError(f"malformed msgpack in a list or map bin: {len(data) - pos} trailing bytes")
    return value


def _unpack(b: memoryview, p: int):
    c = b[p]
    p += 1
    if c < 0x80:
        return c, p
    if c >= 0xE0:
        return c - 256, p
    if 0x80 <= c <= 0x8F:
        return _unpack_map(b, p, c & 0x0F)
    if 0x90 <= c <= 0x9F:
        return _unpack_list(b, p, c & 0x0F)
    if 0xA0 <= c <= 0xBF:
        return _unpack_raw(b, p, c & 0x1F)
    if c == 0xC0:
        return None, p
    if c == 0xC2:
        return False, p
    if c == 0xC3:
        return True, p
    if c in (0xC4, 0xD9):
        return _unpack_raw(b, p + 1, b[p])
    if c in (0xC5, 0xDA):
        return _unpack_raw(b, p + 2, struct.unpack_from(">H", b, p)[0])
    if c in (0xC6, 0xDB):
        return _unpack_raw(b, p + 4, struct.unpack_from(">I", b, p)[0])
    fixed = _FIXED.get(c)
    if fixed is not None:
        fmt, size = fixed
        return struct.unpack_from(fmt, b, p)[0], p + size
    if c == 0xDC:
        return _unpack_list(b, p + 2, struct.unpack_from(">H", b, p)[0])
    if c == 0xDD:
        return _unpack_list(b, p + 4, struct.unpack_from(">I", b, p)[0])
    if c == 0xDE:
        return _unpack_map(b, p + 2, struct.unpack_from(">H", b, p)[0])
    if c == 0xDF:
        return _unpack_map(b, p + 4, struct.unpack_from(">I", b, p)[0])
    ext = _EXT_SIZES.get(c)
    if ext is not None:  # ext values: Aerospike's list/map order flags (and wildcards)
        size, hdr = ext
        if size is None:
            size = int.from_bytes(b[p:p + hdr], "big")
            p += hdr
        return _Ext(b[p], bytes(b[p + 1:p + 1 + size])), p + 1 + size
    raise ValueError(f"unsupported msgpack byte 0x{c:02x}")


_FIXED = {0xCA: (">f", 4), 0xCB: (">d", 8), 0xCC: (">B", 1), 0xCD: (">H", 2), 0xCE: (">I", 4),
          0xCF: (">Q", 8), 0xD0: (">b", 1), 0xD1: (">h", 2), 0xD2: (">i", 4), 0xD3: (">q", 8)}
_EXT_SIZES = {0xD4: (1, 0), 0xD5: (2, 0), 0xD6: (4, 0), 0xD7: (8, 0), 0xD8: (16, 0),
              0xC7: (None, 1), 0xC8: (None, 2), 0xC9: (None, 4)}


class _Ext:
    def __init__(self, type_, data):
        self.type, self.data = type_, data


def _unpack_raw(b: memoryview, p: int, n: int):
    raw = bytes(b[p:p + n])
    if len(raw) != n:
        raise ValueError("truncated msgpack string")
    p += n
    if not raw:
        return "", p
    ptype, body = raw[0], raw[1:]
    if ptype == _PT_STRING:
        return _text(body), p
    if ptype == _PT_GEOJSON:
        return GeoJSON(_text(body)), p
    return body, p  # blobs (and other byte particles) as bytes


def _unpack_list(b, p, n):
    items = []
    for _ in range(n):
        v, p = _unpack(b, p)
        items.append(v)
    if items and isinstance(items[0], _Ext):  # ordered-list flag header
        items.pop(0)
    return items, p


def _unpack_map(b, p, n):
    result: dict = {}
    for idx in range(n):
        k, p = _unpack(b, p)
        v, p = _unpack(b, p)
        if idx == 0 and isinstance(k, _Ext):
            if k.type & 1:  # Aerospike keeps map flags in the ext type: 1 = key ordered
                result = KeyOrderedMap()
            continue
        if isinstance(k, list):
            k = tuple(k)
        result[k] = v
    return result, p


def to_python(bin_type: str, value: Any) -> Any:
    """A bin's .asb value as a Python value for the client (lists/maps decoded)."""
    t = bin_type.rstrip("!")
    if t == "L" or t == "M":
        return unpack(value)
    if t == "G":
        return GeoJSON(value)
    if t == "Y":
        return HLL(value)
    return value


def from_python(value: Any) -> tuple[str, Any]:
    """(bin type, .asb value) for a Python value read by the client."""
    if value is None:
        return "N", None
    if value is True or value is False:
        return "Z", value
    if isinstance(value, int):
        return "I", value
    if isinstance(value, float):
        return "D", value
    if isinstance(value, GeoJSON):
        return "G", str(value)
    if isinstance(value, str):
        return "S", value
    if isinstance(value, HLL) or type(value).__name__ == "HyperLogLog":
        return "Y", bytes(value)
    if isinstance(value, (bytes, bytearray)):
        return "B", bytes(value)
    if isinstance(value, (list, tuple)):
        return "L", pack(value)
    if isinstance(value, dict):
        return "M", pack(value)
    if type(value).__name__ == "GeoJSON":  # aerospike.GeoJSON
        return "G", value.dumps()
    raise ValueError(f"cannot store {type(value).__name__} in .asb")


def count_by_set(source: BinaryIO | Iterable[bytes], name: str | None = None) -> dict[str, int]:
    """Records per set ("" for no set) of a .asb stream, skipping bin values."""
    counts: dict[str, int] = {}
    for obj in AsbReader(source, name=name, decode_bins=False):
        if isinstance(obj, AsbRecord):
            key = obj.set or ""
            counts[key] = counts.get(key, 0) + 1
    return counts


__all__ = [
    "AsbError", "AsbHeader", "AsbUDF", "AsbIndex", "AsbRecord", "AsbDecoder", "AsbReader",
    "AsbWriter", "GeoJSON", "HLL", "KeyOrderedMap", "pack", "unpack", "to_python",
    "from_python", "count_by_set", "partition_id", "escape", "CITRUSLEAF_EPOCH",
    "format_float_asbackup", "format_float_absctl",
]
