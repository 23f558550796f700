"""Pure parts of the archiver: object keys, file extensions and size limits."""

from __future__ import annotations

import pytest

from api_contracts.jobs import OutputKind
from worker.services.s3 import (
    MAX_IMAGE_BYTES,
    MAX_VIDEO_BYTES,
    extension_for,
    max_bytes_for,
    object_key,
)

IMAGE = OutputKind.IMAGE
VIDEO = OutputKind.VIDEO


@pytest.mark.parametrize(
    ("prefix", "job_id", "index", "ext", "expected"),
    [
        ("runcomfy/", "job_1", 0, "png", "runcomfy/job_1/0.png"),
        ("runcomfy/", "job_1", 12, "mp4", "runcomfy/job_1/12.mp4"),
        ("", "abc-DEF", 3, "jpg", "abc-DEF/3.jpg"),
        ("archive/2024/", "j", 0, "webp", "archive/2024/j/0.webp"),
        ("no-slash-", "j", 1, "gif", "no-slash-j/1.gif"),
    ],
)
def test_object_key(prefix: str, job_id: str, index: int, ext: str, expected: str) -> None:
    assert object_key(prefix, job_id, index, ext) == expected


@pytest.mark.parametrize(
    ("content_type", "kind", "url", "expected"),
    [
        # The Content-Type wins, parameters and case ignored.
        ("image/png", IMAGE, "https://cdn.example/x", "png"),
        ("image/jpeg", IMAGE, "https://cdn.example/x.png", "jpg"),
        ("IMAGE/JPEG; charset=binary", IMAGE, "https://cdn.example/x", "jpg"),
        ("image/jpg", IMAGE, "https://cdn.example/x", "jpg"),
        ("image/webp", IMAGE, "https://cdn.example/x", "webp"),
        ("image/gif", IMAGE, "https://cdn.example/x", "gif"),
        ("video/mp4", VIDEO, "https://cdn.example/x", "mp4"),
        ("video/webm", VIDEO, "https://cdn.example/x", "webm"),
        ("video/quicktime", VIDEO, "https://cdn.example/x", "mov"),
        # Unknown or generic types fall back to the URL path's suffix …
        ("application/octet-stream", IMAGE, "https://cdn.example/a/b.webp", "webp"),
        (None, IMAGE, "https://cdn.example/a/b.JPEG", "jpg"),
        (None, IMAGE, "https://cdn.example/a/b.jpg?X-Amz-Signature=abc.png", "jpg"),
        ("", VIDEO, "https://cdn.example/v/clip.mov#t=1", "mov"),
        ("text/html", VIDEO, "https://cdn.example/v/clip.webm", "webm"),
        # … and then to the kind's default.
        (None, IMAGE, "https://cdn.example/a/b", "png"),
        (None, VIDEO, "https://cdn.example/a/b", "mp4"),
        (None, IMAGE, "https://cdn.example/a/b.exe", "png"),
        (None, IMAGE, "https://cdn.example/dir.gif/", "png"),
        (None, IMAGE, "https://cdn.example/?file=x.gif", "png"),
        (None, IMAGE, "http://[::1", "png"),
    ],
)
def test_extension_for(content_type: str | None, kind: OutputKind, url: str, expected: str) -> None:
    assert extension_for(content_type, kind, url) == expected


def test_size_limits_follow_the_documented_upstream_limits() -> None:
    assert MAX_IMAGE_BYTES == 50 * 1024 * 1024
    assert MAX_VIDEO_BYTES == 100 * 1024 * 1024
    assert max_bytes_for(IMAGE) == MAX_IMAGE_BYTES
    assert max_bytes_for(VIDEO) == MAX_VIDEO_BYTES
