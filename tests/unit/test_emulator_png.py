"""The emulator's file builders: valid PNGs of exact sizes, padding, a plausible MP4."""

from __future__ import annotations

import struct
import time
import zlib

import pytest

from api_contracts.inputs import SIZES, size_dimensions
from worker.devtools.emulator.png import (
    PAD_CHUNK_TYPE,
    PNG_SIGNATURE,
    Blob,
    mp4_blob,
    png_blob,
    png_bytes,
)


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """Every (type, data) of a PNG, checking framing and CRCs."""
    assert data[:8] == PNG_SIGNATURE
    found = []
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        found.append((kind, body))
        pos += 12 + length
    assert pos == len(data)
    assert found[0][0] == b"IHDR"
    assert found[-1] == (b"IEND", b"")
    return found


def decode_rgb(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and unfiltered RGB rows (filters None and Up only, as the builder uses)."""
    found = chunks(data)
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(
        ">IIBBBBB", found[0][1]
    )
    assert (depth, colour, compression, filtering, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in found if kind == b"IDAT"))
    stride = width * 3
    assert len(raw) == height * (stride + 1)
    rows: list[bytes] = []
    previous = bytes(stride)
    for y in range(height):
        line = raw[y * (stride + 1) : (y + 1) * (stride + 1)]
        if line[0] == 0:
            row = line[1:]
        elif line[0] == 2:
            row = bytes((a + b) % 256 for a, b in zip(line[1:], previous, strict=True))
        else:
            pytest.fail(f"unexpected filter {line[0]}")
        rows.append(row)
        previous = row
    return width, height, rows


@pytest.mark.parametrize(("width", "height"), [(1, 1), (7, 3), (64, 40), (300, 13), (13, 300)])
def test_small_png_decodes_to_exact_size(width: int, height: int) -> None:
    got_w, got_h, rows = decode_rgb(png_bytes(width, height))
    assert (got_w, got_h) == (width, height)
    assert all(len(row) == width * 3 for row in rows)


def test_picture_is_horizontal_gradient_in_colour_bands() -> None:
    _, _, rows = decode_rgb(png_bytes(64, 48))
    distinct = list(dict.fromkeys(rows))
    assert len(distinct) == 12  # one row per band
    first = rows[0]
    assert first[0] != first[-3]  # left and right differ: a gradient, not a flat colour


def test_variants_differ_and_are_deterministic() -> None:
    assert png_bytes(32, 32, 0) != png_bytes(32, 32, 1)
    png_bytes.cache_clear()
    first = png_bytes(32, 32, 2)
    png_bytes.cache_clear()
    assert png_bytes(32, 32, 2) == first


@pytest.mark.parametrize("size", SIZES)
def test_every_upstream_size_has_the_right_header(size: str) -> None:
    width, height = size_dimensions(size)
    ihdr = chunks(png_bytes(width, height))[0][1]
    assert struct.unpack(">II", ihdr[:8]) == (width, height)


def test_largest_size_is_cheap_and_decompresses_fully() -> None:
    png_bytes.cache_clear()
    started = time.perf_counter()
    data = png_bytes(6198, 2656, 3)
    assert time.perf_counter() - started < 2.0
    assert len(data) < 1_000_000
    idat = b"".join(body for kind, body in chunks(data) if kind == b"IDAT")
    assert len(zlib.decompress(idat)) == 2656 * (6198 * 3 + 1)


def test_padding_reaches_min_bytes_exactly_and_stays_valid() -> None:
    base = png_bytes(100, 50)
    blob = png_blob(100, 50, 0, 10_000)
    data = blob.to_bytes()
    assert blob.size == len(data) == 10_000
    kinds = [kind for kind, _ in chunks(data)]
    assert kinds[-2] == PAD_CHUNK_TYPE
    assert PAD_CHUNK_TYPE[0:1].islower()  # ancillary: decoders may skip it
    assert PAD_CHUNK_TYPE[1:2].islower()  # private
    assert decode_rgb(data)[2] == decode_rgb(base)[2]


def test_no_padding_when_already_big_enough() -> None:
    assert png_blob(100, 50, 0, 10).to_bytes() == png_bytes(100, 50)


def test_large_padding_stays_virtual() -> None:
    blob = png_blob(16, 16, 1, 40 * 1024 * 1024)
    assert blob.size == 40 * 1024 * 1024
    assert any(isinstance(part, int) and part > 30_000_000 for part in blob.parts)
    total = 0
    for piece in blob.chunks(1 << 16):
        assert len(piece) <= 1 << 16
        total += len(piece)
    assert total == blob.size


def test_blob_chunks_join_to_bytes() -> None:
    blob = Blob((b"abc", 5, b"de"))
    assert blob.size == 10
    assert b"".join(bytes(c) for c in blob.chunks(2)) == b"abc\0\0\0\0\0de" == blob.to_bytes()


def test_bad_dimensions_are_refused() -> None:
    with pytest.raises(ValueError, match="dimensions"):
        png_bytes(0, 10)


def test_mp4_is_iso_bmff_boxes() -> None:
    data = mp4_blob().to_bytes()
    assert data[4:12] == b"ftypisom"
    boxes = []
    pos = 0
    while pos < len(data):
        (size,) = struct.unpack(">I", data[pos : pos + 4])
        boxes.append(data[pos + 4 : pos + 8])
        pos += size
    assert pos == len(data)
    assert boxes == [b"ftyp", b"moov", b"mdat"]


def test_mp4_padding() -> None:
    assert mp4_blob(5000).size == 5000
