"""A lean streaming tar reader: (name, bytes) of each regular file, in order.

Python's tarfile builds a TarInfo object with every field for each member and reads through several
layers; shards hold two small members per sample (a 2 KB image and its json), so that machinery's
per-member cost weighs on the loader. This reads the 512-byte headers directly: ustar names with
prefixes, GNU long names ('L') and pax paths ('x'). Damage raises tarfile.ReadError. The stream is
read in chunks of ``CHUNK`` bytes and members are cut out of them, rather than three reads per
member (header, data, padding), each with its own call overhead.
"""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Iterator

BLOCK = 512
CHUNK = 1 << 20


def _read_exact(stream, n: int) -> bytes:
    data = stream.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = stream.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _number(field: bytes) -> int:
    if field[:1] == b"\x80":  # GNU base-256 for large sizes
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _size(header: bytes) -> int:
    """The size field; Python's tarfile and GNU tar write 11 octal digits and a NUL, which
    int() reads directly (any other form: _number)."""
    if header[135] == 0:
        try:
            return int(header[124:135], 8)
        except ValueError:
            pass
    return _number(header[124:136])


def _checksum_ok(header: bytes) -> bool:
    """The stored checksum equals the sum of all bytes with the checksum field read as 8
    spaces. The usual field is six octal digits, NUL, space: compared as bytes."""
    field = header[148:156]
    computed = _byte_sum(header) - ((zlib.adler32(field) & 0xFFFF) - 1) + 32 * 8
    return field == b"%06o\0 " % computed or _number(field) == computed


def _byte_sum(block: bytes) -> int:
    """sum(block) for a 512-byte block, in C rather than a Python iteration over the bytes:
    Adler-32's low half is 1 + the sum of the bytes modulo 65521, which is exact for 256 bytes
    (at most 65,280)."""
    return (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) - 2


def _pax_path(data: bytes) -> str | None:
    path = None
    while data:
        length_text, _, _ = data.partition(b" ")
        length = int(length_text)
        record, data = data[:length], data[length:]
        key, _, value = record[len(length_text) + 1 : -1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8")
    return path


def tar_members(stream, chunk: int = CHUNK) -> Iterator[tuple[str, bytes]]:
    buf, pos = b"", 0  # buf[pos:] is read but not yet parsed
    long_name = None
    while True:
        if len(buf) - pos < BLOCK:
            buf, pos = buf[pos:] + _read_exact(stream, chunk), 0
        header = buf[pos : pos + BLOCK]
        if not header or (header[0] == 0 and header.count(0) == BLOCK):  # end of archive
            return
        if len(header) < BLOCK:
            raise tarfile.ReadError("truncated tar header")
        if not _checksum_ok(header):
            raise tarfile.ReadError("bad tar header checksum")
        size = _size(header)
        start, padded = pos + BLOCK, size + (-size % BLOCK)
        if start + padded <= len(buf):
            data, pos = buf[start : start + size], start + padded
        elif padded < chunk:  # refill, keeping what is left
            buf = buf[start:] + _read_exact(stream, chunk)
            data, pos = buf[:size], padded  # past the end of a short last buffer: tolerated
        else:  # a large member: the rest of it straight from the stream, not through buf
            data = buf[start : start + size]
            data += _read_exact(stream, size - len(data))
            _read_exact(stream, padded - size - max(0, len(buf) - start - size))
            buf, pos = b"", 0
        if len(data) < size:
            raise tarfile.ReadError("truncated tar member")
        kind = header[156:157]
        if kind == b"L":
            long_name = data.split(b"\0", 1)[0].decode("utf-8")
        elif kind == b"x":
            long_name = _pax_path(data) or long_name
        elif kind in (b"0", b"\0", b"7"):
            name = header[:100].split(b"\0", 1)[0].decode("utf-8")
            if header[345] and header[257:262] == b"ustar":  # a ustar name prefix
                name = header[345:500].split(b"\0", 1)[0].decode("utf-8") + "/" + name
            yield (long_name or name), data
            long_name = None
        elif kind != b"g":
            long_name = None  # directories, links: not samples
