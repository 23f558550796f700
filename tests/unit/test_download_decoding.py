"""The archiver decodes gzip/deflate bodies in bounded steps: a tiny body that expands by
orders of magnitude (stacked codings) never sits in memory whole, and stops at the limit."""

from __future__ import annotations

import gzip
import tracemalloc
import zlib
from typing import TYPE_CHECKING, Any, cast

import httpx
import pytest
from botocore.exceptions import ClientError

from api_contracts.jobs import OutputKind
from worker.errors import OutputTooLargeError
from worker.services.s3 import MAX_IMAGE_BYTES, Archiver
from worker.settings import S3Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

MIB = 1024 * 1024


class FakeS3:
    """Just enough S3 for an upload that is aborted: records operations, keeps no bytes."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def head_object(self, **_: Any) -> Any:
        self.calls.append("HeadObject")
        answer: Any = {"Error": {"Code": "404"}, "ResponseMetadata": {"HTTPStatusCode": 404}}
        raise ClientError(answer, "HeadObject")

    def create_multipart_upload(self, **_: Any) -> Any:
        self.calls.append("CreateMultipartUpload")
        return {"UploadId": "upload-1"}

    def upload_part(self, **_: Any) -> Any:
        self.calls.append("UploadPart")
        return {"ETag": '"etag"'}

    def abort_multipart_upload(self, **_: Any) -> Any:
        self.calls.append("AbortMultipartUpload")
        return {}


def _gzip_of_zeros(size: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(MIB)
    parts = [packer.compress(block) for _ in range(size // MIB)]
    return b"".join([*parts, packer.flush()])


def test_a_stacked_gzip_bomb_is_decoded_in_bounded_memory() -> None:
    # ~1 KB on the wire, 128 MiB after two rounds of gzip: decoding a network read whole
    # (as httpx's iter_bytes does) would hold 128 MiB at once.
    bomb = gzip.compress(_gzip_of_zeros(128 * MIB), compresslevel=9)
    assert len(bomb) < 64 * 1024

    def serve(request: httpx.Request) -> httpx.Response:
        headers = {"content-type": "image/png", "content-encoding": "gzip, gzip"}
        # A stream, not content=: httpx would read and decode content= whole, up front.
        return httpx.Response(200, headers=headers, stream=httpx.ByteStream(bomb))

    s3 = FakeS3()
    settings = S3Settings(bucket="outputs", part_size_bytes=5 * MIB)
    with httpx.Client(transport=httpx.MockTransport(serve), timeout=5.0) as http:
        archiver = Archiver(cast("S3Client", s3), settings, http)
        tracemalloc.start()
        try:
            with pytest.raises(OutputTooLargeError, match="over the 50 MiB limit"):
                archiver.archive_one(
                    job_id="j",
                    request_id="r",
                    index=0,
                    kind=OutputKind.IMAGE,
                    source_url="https://cdn.example/bomb.png",
                )
            _current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()

    # One part buffer (5 MiB) plus a few decoding steps; nowhere near the expanded size.
    assert peak < 16 * MIB
    assert s3.calls[-1] == "AbortMultipartUpload"
    # every full part but the last went up before the limit was seen
    assert s3.calls.count("UploadPart") == MAX_IMAGE_BYTES // (5 * MIB) - 1
