"""A float32 matrix streamed row by row into a NumPy ``.npy`` file, without NumPy.

The ``.npy`` format (version 1.0, numpy/lib/format.py) is a 10-byte prefix (magic ``\\x93NUMPY``,
version 1.0, the header's length as little-endian uint16), a header that is a Python dict literal
(``descr``, ``fortran_order``, ``shape``) padded with spaces and ended by a newline so the data
starts at a multiple of 64 bytes, then the data in C order.

The shape is known only at the end (how many rows came back, how long they are), so a placeholder
header of :data:`HEADER_BYTES` is written first and rewritten in place, the same length, once the
last row is in: memory stays one row, whatever the number of rows. A fixed size wide enough for any
shape is simpler than knowing the row count up front (a job's successful results are known only
once they are all back).
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence
from typing import BinaryIO

MAGIC = b"\x93NUMPY\x01\x00"
#: Prefix and header together: room for a shape of two 20-digit numbers, a multiple of 64.
HEADER_BYTES = 128
#: float32 in this machine's byte order, which array("f") writes.
DESCR = "<f4" if sys.byteorder == "little" else ">f4"


def _header(rows: int, columns: int) -> bytes:
    text = f"{{'descr': '{DESCR}', 'fortran_order': False, 'shape': ({rows}, {columns}), }}"
    body_bytes = HEADER_BYTES - len(MAGIC) - 2
    padded = text.ljust(body_bytes - 1) + "\n"
    if len(padded) != body_bytes:
        raise ValueError(f"shape ({rows}, {columns}) does not fit a {HEADER_BYTES}-byte .npy header")
    return MAGIC + struct.pack("<H", body_bytes) + padded.encode("latin1")


class NpyRowWriter:
    """Rows of floats, all of one length, appended to a seekable binary file as a float32 ``.npy`` matrix.

    The first row sets the row length; :meth:`close` writes the final shape (``(0, 0)`` with no rows).
    """

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.rows = 0
        self.columns: int | None = None
        file.write(_header(0, 0))

    def add(self, values: Sequence[float]) -> int:
        """Append one row; returns its index. Raises ``ValueError`` for a row of another length."""
        if self.columns is None:
            self.columns = len(values)
        elif len(values) != self.columns:
            raise ValueError(f"{len(values)} values where the rows before have {self.columns}")
        self._file.write(array("f", values).tobytes())
        self.rows += 1
        return self.rows - 1

    def close(self) -> None:
        """Rewrite the header with the final shape; the file is left positioned at its end."""
        end = self._file.tell()
        self._file.seek(0)
        self._file.write(_header(self.rows, self.columns or 0))
        self._file.seek(end)
