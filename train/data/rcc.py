"""Reader for Qt binary resource bundles (``.rcc``), so GCompris' sounds can be used without Qt.

Format (qtbase/src/corelib/io/qresource.cpp, rcc.cpp): a 20/24-byte big-endian header
``"qres" version tree_offset data_offset names_offset [flags]``, a tree of fixed-size nodes
(14 bytes in version 1, 22 bytes from version 2 which adds a last-modified stamp), a names
table (``u16 length, u32 hash, UTF-16BE chars``) and a data table (``u32 size, bytes``).
File nodes may be zlib-compressed (``qCompress``: 4-byte expected length, then a zlib
stream) or zstd-compressed (a raw zstd frame); zstd needs the optional ``zstandard`` module
and such entries are reported as unsupported rather than failing the whole bundle.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

FLAG_COMPRESSED = 0x01
FLAG_DIRECTORY = 0x02
FLAG_COMPRESSED_ZSTD = 0x04


class RccError(ValueError):
    """The bytes are not a readable rcc bundle, or one entry cannot be decoded."""


@dataclass(frozen=True)
class RccEntry:
    """One file inside a bundle; ``compression`` is ``none``, ``zlib`` or ``zstd``."""

    path: str
    compression: str
    _bundle: "RccBundle"
    _data_offset: int

    def read(self) -> bytes:
        """Return the entry's uncompressed bytes; raise :class:`RccError` if it cannot be."""
        return self._bundle._payload(self._data_offset, self.compression)


class RccBundle:
    """A parsed ``.rcc`` file; iterate :meth:`entries` to list every file with its path."""

    def __init__(self, data: bytes):
        if len(data) < 20 or data[:4] != b"qres":
            raise RccError("not a Qt resource bundle (missing 'qres' magic)")
        self.version, self._tree, self._data, self._names = struct.unpack(">IIII", data[4:20])
        if self.version not in (1, 2, 3):
            raise RccError(f"unsupported rcc version {self.version}")
        self._node_size = 14 if self.version == 1 else 22
        self._bytes = data
        for off in (self._tree, self._data, self._names):
            if off >= len(data):
                raise RccError("rcc header points past the end of the file")

    def _name(self, offset: int) -> str:
        pos = self._names + offset
        (length,) = struct.unpack(">H", self._bytes[pos : pos + 2])
        raw = self._bytes[pos + 6 : pos + 6 + 2 * length]
        return raw.decode("utf-16-be")

    def _node(self, index: int) -> tuple[int, int, int, int]:
        """(name_offset, flags, a, b): a,b = child count, first child for dirs; 0, data offset for files."""
        pos = self._tree + index * self._node_size
        name_off, flags = struct.unpack(">IH", self._bytes[pos : pos + 6])
        if flags & FLAG_DIRECTORY:
            count, first = struct.unpack(">II", self._bytes[pos + 6 : pos + 14])
            return name_off, flags, count, first
        (data_off,) = struct.unpack(">I", self._bytes[pos + 10 : pos + 14])
        return name_off, flags, 0, data_off

    def entries(self) -> Iterator[RccEntry]:
        """Yield every file, depth first, with ``/``-joined paths relative to the bundle root."""
        stack: list[tuple[int, str]] = [(0, "")]
        seen = 0
        while stack:
            index, prefix = stack.pop()
            seen += 1
            if seen > 1_000_000:
                raise RccError("rcc tree is cyclic or absurdly large")
            name_off, flags, a, b = self._node(index)
            name = "" if index == 0 else self._name(name_off)
            path = f"{prefix}/{name}" if prefix else name
            if flags & FLAG_DIRECTORY:
                stack.extend((b + i, path) for i in reversed(range(a)))
            else:
                comp = "zstd" if flags & FLAG_COMPRESSED_ZSTD else "zlib" if flags & FLAG_COMPRESSED else "none"
                yield RccEntry(path, comp, self, b)

    def _payload(self, offset: int, compression: str) -> bytes:
        pos = self._data + offset
        (size,) = struct.unpack(">I", self._bytes[pos : pos + 4])
        blob = self._bytes[pos + 4 : pos + 4 + size]
        if len(blob) != size:
            raise RccError("rcc entry runs past the end of the file")
        if compression == "none":
            return blob
        if compression == "zlib":
            try:
                return zlib.decompress(blob[4:])
            except zlib.error as exc:
                raise RccError(f"corrupt zlib entry: {exc}") from exc
        try:
            import zstandard  # type: ignore[import-not-found]
        except ImportError as exc:
            raise RccError("zstd-compressed entry and the 'zstandard' module is not installed") from exc
        try:
            return zstandard.ZstdDecompressor().decompress(blob, max_output_size=1 << 28)
        except zstandard.ZstdError as exc:
            raise RccError(f"corrupt zstd entry: {exc}") from exc


def write_rcc(files: dict[str, bytes], compress: bool = False, version: int = 2) -> bytes:
    """Build a minimal flat bundle (root dir + files) — used by tests to exercise the reader."""
    names = b""
    name_offsets: dict[str, int] = {}
    for name in files:
        name_offsets[name] = len(names)
        enc = name.encode("utf-16-be")
        names += struct.pack(">HI", len(name), 0) + enc
    data = b""
    data_offsets: dict[str, int] = {}
    for name, payload in files.items():
        data_offsets[name] = len(data)
        blob = struct.pack(">I", len(payload)) + zlib.compress(payload) if compress else payload
        data += struct.pack(">I", len(blob)) + blob
    pad = b"\0" * 8 if version >= 2 else b""
    tree = struct.pack(">IHII", 0, FLAG_DIRECTORY, len(files), 1) + pad
    for name in sorted(files):  # rcc sorts children by name hash; order is irrelevant to readers
        flags = FLAG_COMPRESSED if compress else 0
        tree += struct.pack(">IHHHI", name_offsets[name], flags, 0, 0, data_offsets[name]) + pad
    header_len = 20
    tree_off = header_len
    data_off = tree_off + len(tree)
    names_off = data_off + len(data)
    header = b"qres" + struct.pack(">IIII", version, tree_off, data_off, names_off)
    return header + tree + data + names
