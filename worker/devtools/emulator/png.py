"""Cheap, valid output files for the emulator: PNGs of any size in milliseconds, a plausible MP4.

A 6198×2656 RGB image is 49 MB of raw scanlines, so nothing here ever compresses it row by
row. The picture is a few horizontal bands, each band one gradient row repeated; every repeat
is a PNG "Up" filtered row (filter byte 2, then zeros). Each distinct piece is deflated once,
ended with a full flush (byte-aligned, no back-references across it), so the compressed pieces
can be repeated and concatenated into one valid zlib stream; the Adler-32 is computed over the
real scanlines. Padding (``output_min_bytes``) is a private ancillary chunk of zeros that stays
virtual (a count, not bytes) until it is streamed.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
#: Ancillary (e), private (m), reserved bit clear (P), safe to copy (d): decoders skip it.
PAD_CHUNK_TYPE: Final = b"emPd"
#: Largest chunk length PNG allows.
MAX_CHUNK_LENGTH: Final = 2**31 - 1

_CHUNK_SIZE: Final = 1 << 20
_ZEROS: Final = bytes(_CHUNK_SIZE)
_ZERO_ROWS_PER_PIECE: Final = 256
_BANDS: Final = 12
_IEND: Final = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


@dataclass(frozen=True)
class Blob:
    """A file body as parts: ``bytes``, or an ``int`` meaning that many zero bytes."""

    parts: tuple[bytes | int, ...]

    @property
    def size(self) -> int:
        """Total length in bytes."""
        return sum(p if isinstance(p, int) else len(p) for p in self.parts)

    def chunks(self, chunk_size: int = _CHUNK_SIZE) -> Iterator[bytes | memoryview]:
        """The body in pieces of at most ``chunk_size`` bytes, without materialising it."""
        chunk_size = min(chunk_size, _CHUNK_SIZE)
        for part in self.parts:
            if isinstance(part, int):
                zeros = memoryview(_ZEROS)
                for start in range(0, part, chunk_size):
                    yield zeros[: min(chunk_size, part - start)]
            else:
                view = memoryview(part)
                for start in range(0, len(part), chunk_size):
                    yield view[start : start + chunk_size]

    def to_bytes(self) -> bytes:
        """The whole body (tests and small files only)."""
        return b"".join(bytes(c) for c in self.chunks())


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _deflate_piece(data: bytes, level: int = 6) -> bytes:
    """Raw deflate of ``data`` ending in a full flush, so it can be repeated and concatenated."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush(zlib.Z_FULL_FLUSH)


@lru_cache(maxsize=64)
def _zero_rows(stride: int, rows: int) -> tuple[bytes, bytes]:
    """``rows`` Up-filtered rows identical to the row above: (raw scanlines, deflated piece)."""
    raw = (b"\x02" + bytes(stride)) * rows
    return raw, _deflate_piece(raw, 9)


@lru_cache(maxsize=32)
def _gradient_row(width: int, variant: int) -> bytes:
    """One RGB row: red rises left to right, green falls, blue depends on the variant."""
    blue = (64 * variant + 96) % 256
    denominator = max(width - 1, 1)
    row = bytearray(width * 3)
    for x in range(width):
        level = 255 * x // denominator
        row[3 * x] = level
        row[3 * x + 1] = 255 - level
        row[3 * x + 2] = blue
    return bytes(row)


def _band_table(band: int, variant: int) -> bytes:
    """Byte translation that shifts every channel, so bands (and variants) differ in colour."""
    shift = (band * 37 + variant * 85) % 256
    return bytes((v + shift) % 256 for v in range(256))


@lru_cache(maxsize=32)
def png_bytes(width: int, height: int, variant: int = 0) -> bytes:
    """A valid 8-bit RGB PNG of exactly ``width``×``height``; ``variant`` changes the colours."""
    if not (1 <= width <= 2**31 - 1 and 1 <= height <= 2**31 - 1):
        raise ValueError(f"bad PNG dimensions {width}x{height}")
    stride = width * 3
    base_row = _gradient_row(width, variant % 4)
    bands = min(_BANDS, height)
    band_height = -(-height // bands)
    pieces: list[bytes] = []
    adler = 1
    row = 0
    for band in range(bands):
        rows = min(band_height, height - row)
        if rows <= 0:
            break
        first = b"\x00" + base_row.translate(_band_table(band, variant))
        pieces.append(_deflate_piece(first))
        adler = zlib.adler32(first, adler)
        repeats = rows - 1
        full, rest = divmod(repeats, _ZERO_ROWS_PER_PIECE)
        if full:
            raw, packed = _zero_rows(stride, _ZERO_ROWS_PER_PIECE)
            pieces.extend([packed] * full)
            for _ in range(full):
                adler = zlib.adler32(raw, adler)
        if rest:
            raw, packed = _zero_rows(stride, rest)
            pieces.append(packed)
            adler = zlib.adler32(raw, adler)
        row += rows
    final_block = zlib.compressobj(9, zlib.DEFLATED, -15).flush(zlib.Z_FINISH)
    # zlib header 0x78 0x01: deflate, 32 KiB window, no preset dictionary, check bits valid.
    idat = b"\x78\x01" + b"".join(pieces) + final_block + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    text = b"Software\x00runcomfy-worker emulator"
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"tEXt", text)
        + _chunk(b"IDAT", idat)
        + _IEND
    )


@lru_cache(maxsize=16)
def _zeros_crc(kind: bytes, length: int) -> int:
    crc = zlib.crc32(kind)
    for start in range(0, length, _CHUNK_SIZE):
        crc = zlib.crc32(_ZEROS[: min(_CHUNK_SIZE, length - start)], crc)
    return crc


def _padding_chunk(kind: bytes, length: int) -> tuple[bytes, int, bytes]:
    """A chunk of ``length`` zero bytes as (header, zero count, CRC trailer)."""
    if length > MAX_CHUNK_LENGTH:
        raise ValueError(f"padding of {length} bytes does not fit one chunk")
    return struct.pack(">I", length) + kind, length, struct.pack(">I", _zeros_crc(kind, length))


@lru_cache(maxsize=64)
def png_blob(width: int, height: int, variant: int = 0, min_bytes: int = 0) -> Blob:
    """:func:`png_bytes`, padded with a private ancillary chunk to at least ``min_bytes``."""
    base = png_bytes(width, height, variant)
    missing = min_bytes - len(base)
    if missing <= 0:
        return Blob((base,))
    # The padding chunk has 12 bytes of framing; a shortfall under 12 still gets an empty chunk.
    header, zeros, trailer = _padding_chunk(PAD_CHUNK_TYPE, max(missing - 12, 0))
    body = base[: -len(_IEND)]
    return Blob((body + header, zeros, trailer + _IEND))


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


@lru_cache(maxsize=16)
def mp4_blob(min_bytes: int = 0, variant: int = 0) -> Blob:
    """A small ISO-BMFF file (ftyp, moov/mvhd, mdat) that tools recognise as MP4; not playable."""
    ftyp = _box(b"ftyp", b"isom" + struct.pack(">I", 512) + b"isomiso2avc1mp41")
    identity = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
    mvhd = (
        struct.pack(">B3xIIII", 0, 0, 0, 1000, 2000 + 1000 * variant)  # version, times, 2 s+
        + struct.pack(">IH10x", 0x10000, 0x100)  # rate 1.0, volume 1.0, reserved
        + identity
        + bytes(24)  # pre_defined
        + struct.pack(">I", 2)  # next_track_ID
    )
    moov = _box(b"moov", _box(b"mvhd", mvhd))
    payload_len = max(min_bytes - len(ftyp) - len(moov) - 8, 64)
    mdat_header = struct.pack(">I", 8 + payload_len) + b"mdat"
    if 8 + payload_len > 2**32 - 1:
        raise ValueError("video padding too large")
    return Blob((ftyp + moov + mdat_header, payload_len))
