"""A minimal PNG writer (8-bit grayscale), so that pictures need no imaging library."""

from __future__ import annotations

import struct
import zlib

import numpy

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def encode_png(pixels) -> bytes:
    """PNG bytes of a 2-D uint8 array (0 black, 255 white), one pixel per element."""
    pixels = numpy.ascontiguousarray(pixels, dtype=numpy.uint8)
    if pixels.ndim != 2 or 0 in pixels.shape:
        raise ValueError(f"pixels must be a non-empty 2-D array, got shape {pixels.shape}")
    height, width = pixels.shape
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit gray, no interlace
    rows = numpy.hstack([numpy.zeros((height, 1), numpy.uint8), pixels])  # filter 0 per row
    return (SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
            + _chunk(b"IEND", b""))

