"""Read a CTranslate2 ``model.bin`` into named numpy arrays, without CTranslate2 itself.

The file is little-endian: a binary version, the spec name and revision, then each variable as
(name, rank, shape, dtype id, byte count, bytes), then aliases (name -> variable name).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SUPPORTED_VERSIONS = (6,)

#: CTranslate2's DataType enum, in its declaration order.
_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
}
_BFLOAT16 = 5


class CTranslate2FormatError(ValueError):
    """The file is not a CTranslate2 model this reader understands."""


@dataclass(frozen=True)
class CTranslate2Model:
    """A parsed ``model.bin``: spec name and revision, and every variable with aliases resolved."""

    spec: str
    revision: int
    variables: dict[str, np.ndarray]


class _Cursor:
    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0

    def unpack(self, fmt: str) -> tuple:
        fmt = "<" + fmt
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def string(self) -> str:
        (length,) = self.unpack("H")  # includes the trailing NUL
        raw = bytes(self.data[self.pos : self.pos + length - 1])
        self.pos += length
        return raw.decode("utf-8")

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise CTranslate2FormatError(f"truncated file: wanted {n} bytes at offset {self.pos}, have {len(self.data) - self.pos}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk


def _array(raw: memoryview, dtype_id: int, shape: tuple[int, ...], name: str) -> np.ndarray:
    if dtype_id == _BFLOAT16:  # numpy has no bfloat16: widen the upper half of a float32
        halves = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return halves.view(np.float32).reshape(shape)
    if dtype_id not in _DTYPES:
        raise CTranslate2FormatError(f"variable {name!r} has unknown dtype id {dtype_id}")
    return np.frombuffer(raw, dtype=_DTYPES[dtype_id]).reshape(shape).copy()


def read_model(path: Path) -> CTranslate2Model:
    """Parse ``path``; arrays keep their stored dtype (fp16 stays fp16) so callers choose when to widen."""
    data = memoryview(Path(path).read_bytes())
    cur = _Cursor(data)
    (version,) = cur.unpack("I")
    if version not in SUPPORTED_VERSIONS:
        raise CTranslate2FormatError(f"{path}: CTranslate2 binary version {version} is not supported (known: {SUPPORTED_VERSIONS})")
    spec = cur.string()
    (revision,) = cur.unpack("I")
    (count,) = cur.unpack("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = cur.string()
        (rank,) = cur.unpack("B")
        shape = cur.unpack(f"{rank}I") if rank else ()
        dtype_id, nbytes = cur.unpack("BI")
        variables[name] = _array(cur.take(nbytes), dtype_id, tuple(shape), name)
    if cur.pos < len(data):
        (n_aliases,) = cur.unpack("I")
        for _ in range(n_aliases):
            alias, target = cur.string(), cur.string()
            variables[alias] = variables[target]
    return CTranslate2Model(spec=spec, revision=revision, variables=variables)
