"""The lean tar reader gives exactly what Python's tarfile gives, and rejects damage."""

import io
import random
import tarfile

import pytest

from mlc.data.tarstream import _byte_sum, tar_members


def make_tar(members, fmt):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        directory = tarfile.TarInfo("folder")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


MEMBERS = [
    ("000000001.jpg", b"\xff\xd8" + bytes(range(256)) * 7),
    ("000000001.json", b'{"positives": [1]}'),
    ("deep/" * 30 + "000000002.png", b"x" * 512),  # needs a long name
    ("h\u00e9llo/000000003.json", b""),
    ("000000004.jpg", b"y" * 1000),
]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_same_members_as_tarfile(fmt):
    members = MEMBERS if fmt != tarfile.USTAR_FORMAT else [m for m in MEMBERS if len(m[0]) < 100]
    data = make_tar(members, fmt)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    assert list(tar_members(io.BytesIO(data))) == expected == members


def test_ustar_name_prefix():
    """ustar stores a path over 100 characters as prefix + name, split at a slash."""
    members = [("deep/" * 20 + "000000005.png", b"z" * 10), ("short.json", b"{}")]
    data = make_tar(members, tarfile.USTAR_FORMAT)
    assert data[512 + 345 : 512 + 350] == b"deep/"  # the first member's prefix field is used
    assert list(tar_members(io.BytesIO(data))) == members


class Trickle(io.BytesIO):
    """A stream that returns at most 37 bytes per read, like a slow pipe."""

    def read(self, n=-1):
        return super().read(37 if n < 0 else min(n, 37))


@pytest.mark.parametrize("chunk", [512, 700, 1000, 1500, 2100, 2600, 1 << 20])
@pytest.mark.parametrize("stream", [io.BytesIO, Trickle])
def test_chunked_reads_give_the_same_members(chunk, stream):
    """Members cut out of read chunks at every alignment: chunks smaller than a member, ending
    inside headers and padding, short reads."""
    data = make_tar(MEMBERS, tarfile.GNU_FORMAT)
    assert list(tar_members(stream(data), chunk=chunk)) == MEMBERS


def test_damage_raises_read_error():
    data = make_tar(MEMBERS[:2], tarfile.GNU_FORMAT)
    with pytest.raises(tarfile.ReadError, match="truncated"):
        list(tar_members(io.BytesIO(data[:1200])))
    corrupted = bytearray(data)
    corrupted[10] ^= 0x01  # the first header's name: checksum no longer matches
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(tar_members(io.BytesIO(bytes(corrupted))))
    assert list(tar_members(io.BytesIO(b""))) == []


def test_byte_sum_equals_sum_for_any_block():
    rng = random.Random(0)
    blocks = [bytes(512), b"\xff" * 512, bytes(range(256)) * 2]  # the extremes and a ramp
    blocks += [rng.randbytes(512) for _ in range(200)]
    for block in blocks:
        assert _byte_sum(block) == sum(block)


def _rewrite(header: bytearray, size_field: bytes, checksum_format: bytes) -> None:
    header[124:136] = size_field
    header[148:156] = b" " * 8
    header[148:156] = checksum_format % sum(header)


@pytest.mark.parametrize(
    "size_field, checksum_format",
    [
        (b"%011o\0", b"%06o\0 "),  # Python's tarfile and GNU tar
        (b"%o\0\0\0\0\0\0\0\0", b"%07o\0"),  # short octal then NULs; 7-digit checksum
        (b" %011o", b" %06o\0"),  # a leading space, no NUL
        (b"\x80" + bytes(9) + b"%c%c", b"%06o\0 "),  # GNU base-256
    ],
)
def test_number_fields_in_any_encoding(size_field, checksum_format):
    """Size and checksum written the ways other tar writers write them read the same."""
    data = bytearray(make_tar(MEMBERS[:2], tarfile.GNU_FORMAT))
    start = 512  # after the directory's header: the members' headers
    for _ in MEMBERS[:2]:
        header = data[start : start + 512]
        size = int(header[124:135], 8)
        field = size_field % (size // 256, size % 256) if b"%c" in size_field else size_field % size
        field = field[:12].ljust(12, b"\0")  # "%o" of 4 digits + 8 NULs: 12 bytes
        _rewrite(header, field, checksum_format)
        data[start : start + 512] = header
        start += 512 + -(-size // 512) * 512
    assert list(tar_members(io.BytesIO(bytes(data)))) == MEMBERS[:2]
