"""Sound files that games ship inside their own archives, read without the games' tools.

A source row's path names the archive and the member: ``zip:ARCHIVE!MEMBER`` (0 A.D.'s
``public.zip``, UFO:AI's ``.pk3``), ``c4group:ARCHIVE!Group.ocg/file`` (OpenClonk's C4Group,
nested groups separated by ``/``) and ``cat:ARCHIVE!N`` (entry N of OpenTTD's OpenSFX catalogue).
``ARCHIVE`` is a path inside the unpacked package. Opened archives are kept per process, so a
decode worker reads each one once.
"""

from __future__ import annotations

import functools
import gzip
import struct
import zipfile
from pathlib import Path

PREFIXES = ("zip:", "c4group:", "cat:")


class ArchiveError(ValueError):
    """A member could not be read: the archive is damaged, or has no such member."""


def is_archived(path: str) -> bool:
    return path.startswith(PREFIXES)


def archive_file(path: str) -> str:
    """The package file a row needs unpacked: the archive for an archived member, else the path itself."""
    if not is_archived(path):
        return path
    return path.split(":", 1)[1].split("!", 1)[0]


def read_member(path: str, root: Path) -> bytes:
    """The bytes of one archived member; ``root`` is the unpacked package."""
    kind, rest = path.split(":", 1)
    archive, _, member = rest.partition("!")
    if not member:
        raise ArchiveError(f"{path}: no '!member' part")
    file = Path(root) / archive.lstrip("/")
    if not file.exists():
        raise FileNotFoundError(file)
    if kind == "zip":
        try:
            return _zip(str(file)).read(member)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise ArchiveError(f"{path}: {exc}") from exc
    if kind == "c4group":
        return c4group_member(_c4group_raw(str(file)), member)
    if kind == "cat":
        return opensfx_entry(_bytes(str(file)), int(member))
    raise ArchiveError(f"{path}: unknown archive kind {kind!r}")


@functools.lru_cache(maxsize=4)
def _zip(file: str) -> zipfile.ZipFile:
    return zipfile.ZipFile(file)


@functools.lru_cache(maxsize=2)
def _bytes(file: str) -> bytes:
    return Path(file).read_bytes()


# --------------------------------------------------------------------------- C4Group

C4_MAGIC = b"\x1e\x8c"  # gzip's 1f 8b, each byte less one
C4_ID = b"RedWolf Design GrpFolder"
C4_HEADER = 204
C4_ENTRY = 316
C4_NAME = 260


@functools.lru_cache(maxsize=2)
def _c4group_raw(file: str) -> bytes:
    return c4group_unpack(_bytes(file))


def c4group_unpack(data: bytes) -> bytes:
    """The group's uncompressed bytes: a gzip stream whose two magic bytes were changed."""
    if data[:2] != C4_MAGIC:
        raise ArchiveError("not a C4Group file (bad magic)")
    try:
        return gzip.decompress(b"\x1f\x8b" + data[2:])
    except (OSError, EOFError) as exc:
        raise ArchiveError(f"C4Group: {exc}") from exc


def c4_scramble(header: bytes) -> bytes:
    """The header's scrambling (XOR 237, then bytes 0 and 2 of every 3 swapped); it is its own inverse."""
    h = bytearray(b ^ 237 for b in header)
    for i in range(0, len(h) - 2, 3):
        h[i], h[i + 2] = h[i + 2], h[i]
    return bytes(h)


def c4group_entries(raw: bytes) -> dict[str, tuple[bool, bytes]]:
    """Name → (is a nested group, bytes) of one uncompressed group."""
    if len(raw) < C4_HEADER:
        raise ArchiveError("C4Group: truncated header")
    header = c4_scramble(raw[:C4_HEADER])
    if not header.startswith(C4_ID):
        raise ArchiveError("C4Group: bad header id")
    (count,) = struct.unpack_from("<i", header, 36)
    base = C4_HEADER + C4_ENTRY * count
    if count < 0 or base > len(raw):
        raise ArchiveError("C4Group: bad entry count")
    out: dict[str, tuple[bool, bytes]] = {}
    for k in range(count):
        entry = raw[C4_HEADER + C4_ENTRY * k: C4_HEADER + C4_ENTRY * (k + 1)]
        name = entry[:C4_NAME].split(b"\0", 1)[0].decode("latin-1")
        _packed, child, size, _reserved, offset = struct.unpack_from("<5i", entry, C4_NAME)
        if offset < 0 or size < 0 or base + offset + size > len(raw):
            raise ArchiveError(f"C4Group: entry {name!r} lies outside the group")
        out[name] = (bool(child), raw[base + offset: base + offset + size])
    return out


def c4group_member(raw: bytes, member: str) -> bytes:
    """A file inside (possibly nested) groups: ``Environment.ocg/WindLoop.ogg``."""
    *groups, name = member.split("/")
    for g in groups:
        hit = c4group_entries(raw).get(g)
        if hit is None or not hit[0]:
            raise ArchiveError(f"C4Group: no group {g!r}")
        raw = hit[1]
    hit = c4group_entries(raw).get(name)
    if hit is None or hit[0]:
        raise ArchiveError(f"C4Group: no file {name!r}")
    return hit[1]


# --------------------------------------------------------------------------- OpenSFX catalogue


def opensfx_entry(data: bytes, index: int) -> bytes:
    """Entry ``index`` of an OpenTTD sound catalogue, as its RIFF wav bytes (the description dropped).

    The catalogue opens with (offset | 0x80000000, size) pairs, the first offset ending the table;
    each entry is a length-prefixed description followed by a RIFF file of the listed size.
    """
    if len(data) < 8:
        raise ArchiveError("OpenSFX: truncated table")
    count = (struct.unpack_from("<I", data, 0)[0] & 0x7FFFFFFF) // 8
    if not 0 <= index < count:
        raise ArchiveError(f"OpenSFX: entry {index} of {count}")
    offset, size = struct.unpack_from("<II", data, 8 * index)
    offset &= 0x7FFFFFFF
    if offset >= len(data):
        raise ArchiveError(f"OpenSFX: entry {index} lies outside the catalogue")
    start = offset + 1 + data[offset]  # the size counts the RIFF file, not the description before it
    wav = data[start: start + size]
    if not wav.startswith(b"RIFF") or len(wav) < size:
        raise ArchiveError(f"OpenSFX: entry {index} holds no whole RIFF file")
    return wav


def opensfx_description(data: bytes, index: int) -> str:
    """The entry's own credit line (which freesound.org recording it came from)."""
    offset = struct.unpack_from("<I", data, 8 * index)[0] & 0x7FFFFFFF
    return data[offset + 1: offset + 1 + data[offset]].rstrip(b"\0").decode("utf-8", "replace")
