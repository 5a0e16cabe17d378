"""A lean reader of tar headers for WebDataset shards (3x ``tarfile``'s speed here).

``tarfile`` builds a ``TarInfo`` of a dozen parsed fields per member; a shard of a
million members spends most of its read time there, and a resume that only needs the
members' names spends all of it there. This reads what a shard needs: each regular
member's name, size and data offset, from ustar / GNU / POSIX (pax) headers (GNU long
names and pax ``path``/``size`` records included), checksum verified. Data is read by
the caller through ``read``; whatever it does not read is skipped by seeking (a gzip
stream seeks forward by decompressing: a compressed shard is read whole).

Anything malformed raises ``TarError`` with the offset; a file that ends inside a
header or a member raises ``Truncated``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

__all__ = ["Member", "TarError", "Truncated", "members", "read"]

BLOCK = 512
MAX_META = 1 << 20  # a GNU long name or pax record block larger than this is not sane


class TarError(Exception):
    pass


class Truncated(TarError):
    pass


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    size: int
    offset: int  # where its data starts


def _exact(f: IO[bytes], n: int, what: str, at: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise Truncated(f"unexpected end of data in {what} at offset {at}")
    return data


def _octal(field: bytes, at: int) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 (members over 8 GiB)
        value = int.from_bytes(field[1:], "big")
        return -value if field[:1] == b"\xff" else value
    text = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarError(f"bad number {text[:12]!r} in the header at offset {at}") from None


def _pax(data: bytes, at: int) -> dict[str, str]:
    """``"%d %s=%s\\n"`` records."""
    out: dict[str, str] = {}
    i = 0
    while i < len(data) and data[i:i + 1] != b"\0":
        space = data.find(b" ", i)
        if space < 0:
            raise TarError(f"bad pax record at offset {at}")
        length = int(data[i:space])
        record = data[space + 1:i + length - 1]
        key, _, value = record.partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        i += length
    return out


def members(f: IO[bytes]) -> Iterator[Member]:
    """The regular members of the tar ``f``, in order."""
    pos = 0
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        f.seek(pos)
        head = f.read(BLOCK)
        if not head:  # no end blocks: fine if the last member's data was all there
            if _end(f) < pos:
                raise Truncated(f"unexpected end of data: the archive ends before offset "
                                f"{pos}, where its last member ends")
            return
        if head == bytes(BLOCK):  # the end-of-archive marker
            return
        if len(head) != BLOCK:
            raise Truncated(f"unexpected end of data in a header at offset {pos}")
        stored = _octal(head[148:156], pos)
        if stored != sum(head[:148]) + 256 + sum(head[156:]):
            raise TarError(f"bad header checksum at offset {pos} (not a tar, or corrupt)")
        size = _octal(head[124:136], pos)
        kind = head[156:157]
        data_at = pos + BLOCK
        pos = data_at + (size + BLOCK - 1) // BLOCK * BLOCK
        if kind in (b"L", b"x", b"g"):
            if size > MAX_META:
                raise TarError(f"header extension of {size} bytes at offset {data_at}")
            f.seek(data_at)
            data = _exact(f, size, "a header extension", data_at)
            if kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif kind == b"x":
                pax = _pax(data, data_at)
            continue
        if kind not in (b"0", b"\0", b"7"):  # directories, links, devices: not members
            long_name, pax = None, {}
            continue
        name = long_name or pax.get("path") or _name(head)
        if "size" in pax:
            size = int(pax["size"])
            pos = data_at + (size + BLOCK - 1) // BLOCK * BLOCK
        long_name, pax = None, {}
        yield Member(name, size, data_at)


def _end(f: IO[bytes]) -> int:
    try:
        return f.seek(0, 2)
    except (OSError, ValueError):
        return f.tell()


def _name(head: bytes) -> str:
    name = head[:100].split(b"\0", 1)[0]
    if head[257:262] == b"ustar":
        prefix = head[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def read(f: IO[bytes], m: Member) -> bytes:
    """A member's data (the caller checks its size against its cap first)."""
    f.seek(m.offset)
    return _exact(f, m.size, f"member {m.name!r}", m.offset)
