"""The archiver against a real S3 endpoint (moto over HTTP) and a real local file server."""

from __future__ import annotations

import gzip
import hashlib
import random
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import httpx
import pytest
from botocore.awsrequest import AWSPreparedRequest, AWSResponse, HTTPHeaders

from api_contracts.jobs import ArchivedOutput, OutputKind
from worker.devtools.embedded import EmbeddedS3, free_port
from worker.errors import DownloadError, OutputTooLargeError, StorageError, TargetForbiddenError
from worker.services.s3 import MAX_IMAGE_BYTES, Archiver, make_s3_client
from worker.settings import S3Settings

if TYPE_CHECKING:
    from botocore.model import OperationModel
    from mypy_boto3_s3 import S3Client

pytestmark = pytest.mark.integration

BUCKET = "archive-test"
MIB = 1024 * 1024
BLOCK = MIB


# -- a local file server ----------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """What the file server answers on one path."""

    size: int = 0
    seed: int = 0
    status: int = 200
    content_type: str | None = "image/png"
    #: "length": Content-Length; "chunked": Transfer-Encoding; "close": neither, EOF ends it.
    framing: Literal["length", "chunked", "close"] = "length"
    #: Announce this Content-Length instead of the real size (and close after the body).
    declared_length: int | None = None
    #: Send this many bytes, then hold the connection without sending more.
    stall_after: int | None = None
    write_size: int = 64 * 1024
    #: Wait this long after every write (with write_size=1: a server that trickles).
    pause_s: float = 0.0
    #: Send these bytes as they are, with Content-Length and this Content-Encoding.
    encoded_body: bytes | None = None
    content_encoding: str | None = None


def blocks(size: int, seed: int) -> Iterator[bytes]:
    """Deterministic pseudo-random content, 1 MiB at a time; every block differs."""
    base = random.Random(seed).randbytes(BLOCK)
    for number, start in enumerate(range(0, size, BLOCK)):
        block = number.to_bytes(8, "big") + base[8:]
        yield block[: min(BLOCK, size - start)]


def content(size: int, seed: int) -> bytes:
    """The whole body the server sends for (size, seed)."""
    return b"".join(blocks(size, seed))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_GET(self) -> None:
        files = self.server.files
        path = urlsplit(self.path).path
        files.count(path)
        route = files.routes.get(path)
        if route is None or route.status != 200:
            body = b"not here"
            self.send_response(404 if route is None else route.status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        if route.content_type:
            self.send_header("Content-Type", route.content_type)
        if route.encoded_body is not None:
            if route.content_encoding:
                self.send_header("Content-Encoding", route.content_encoding)
            self.send_header("Content-Length", str(len(route.encoded_body)))
            self.end_headers()
            self.wfile.write(route.encoded_body)
            return
        if route.framing == "length":
            declared = route.declared_length if route.declared_length is not None else route.size
            self.send_header("Content-Length", str(declared))
            if route.declared_length is not None:
                self.close_connection = True
        elif route.framing == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        try:
            self._send_body(route, files.stopping)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send_body(self, route: Route, stopping: threading.Event) -> None:
        sent = 0
        for block in blocks(route.size, route.seed):
            view = memoryview(block)
            for start in range(0, len(view), route.write_size):
                if route.stall_after is not None and sent >= route.stall_after:
                    stopping.wait(30)
                    self.close_connection = True
                    return
                piece = view[start : start + route.write_size]
                if route.framing == "chunked":
                    self.wfile.write(b"%x\r\n" % len(piece))
                    self.wfile.write(piece)
                    self.wfile.write(b"\r\n")
                else:
                    self.wfile.write(piece)
                sent += len(piece)
                if route.pause_s and stopping.wait(route.pause_s):
                    return
        if route.framing == "chunked":
            self.wfile.write(b"0\r\n\r\n")

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read the hit counter instead."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    files: FileServer


class FileServer:
    """A stdlib HTTP server on 127.0.0.1 serving generated bodies and counting GETs per path."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: Counter[str] = Counter()
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.files = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> FileServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def count(self, path: str) -> None:
        with self._lock:
            self.hits[path] += 1

    def add(self, name: str, route: Route) -> str:
        """Serve ``route`` on a fresh path ending in ``name``; returns its URL."""
        path = f"/{uuid.uuid4().hex}/{name}"
        self.routes[path] = route
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}{path}"

    def gets(self, url: str) -> int:
        return self.hits[urlsplit(url).path]


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files() -> Iterator[FileServer]:
    server = FileServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def settings(s3_server: EmbeddedS3) -> S3Settings:
    s3_server.create_bucket(BUCKET)
    return S3Settings(
        bucket=BUCKET,
        prefix="runcomfy/",
        endpoint_url=s3_server.endpoint_url,
        region=EmbeddedS3.REGION,
    )


@pytest.fixture(scope="module")
def s3(settings: S3Settings) -> Iterator[S3Client]:
    client = make_s3_client(settings)
    yield client
    client.close()


@pytest.fixture
def calls(s3: S3Client) -> Iterator[list[str]]:
    """Names of the S3 operations the client makes, in order."""
    made: list[str] = []

    def record(model: OperationModel, **_: Any) -> None:
        made.append(model.name)

    s3.meta.events.register("before-call.s3", record)
    yield made
    s3.meta.events.unregister("before-call.s3", record)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10.0) as client:
        yield client


@pytest.fixture
def archiver(s3: S3Client, settings: S3Settings, http: httpx.Client) -> Archiver:
    return Archiver(s3, settings, http)


def new_job() -> str:
    return f"job-{uuid.uuid4().hex[:12]}"


def keys_under(s3: S3Client, prefix: str) -> list[str]:
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for item in listed.get("Contents", [])]


def uploads_under(s3: S3Client, prefix: str) -> list[str]:
    listed = s3.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix)
    return [item["UploadId"] for item in listed.get("Uploads", [])]


def archive(
    archiver: Archiver, job_id: str, url: str, kind: OutputKind = OutputKind.IMAGE
) -> ArchivedOutput:
    return archiver.archive_one(
        job_id=job_id, request_id="req-123", index=0, kind=kind, source_url=url
    )


def assert_stored(s3: S3Client, out: ArchivedOutput, body: bytes, job_id: str, url: str) -> None:
    """The object holds ``body`` and carries the metadata and type the archiver promised."""
    stored = s3.get_object(Bucket=BUCKET, Key=out.key)
    data = stored["Body"].read()
    digest = hashlib.sha256(data).hexdigest()
    assert data == body
    assert digest == out.sha256 == stored["Metadata"]["sha256"]
    assert stored["ContentLength"] == out.bytes == len(body)
    assert stored["ContentType"] == out.content_type
    assert stored["Metadata"]["job-id"] == job_id
    assert stored["Metadata"]["request-id"] == "req-123"
    assert stored["Metadata"]["source-url"] == url
    assert stored["Metadata"]["kind"] == out.kind.value
    assert stored["Metadata"]["index"] == str(out.index)
    assert stored["Metadata"]["bytes"] == str(len(body))
    assert out.s3_uri == f"s3://{BUCKET}/{out.key}"
    assert out.bucket == BUCKET


# -- the happy paths --------------------------------------------------------------------------


def test_small_png_goes_up_in_one_put(
    files: FileServer, archiver: Archiver, s3: S3Client, calls: list[str]
) -> None:
    body = content(300_000, seed=1)
    url = files.add("out.png", Route(size=len(body), seed=1, content_type="image/png"))
    job_id = new_job()

    out = archive(archiver, job_id, url)

    assert out.key == f"runcomfy/{job_id}/0.png"
    assert out.content_type == "image/png"
    assert out.sha256 == hashlib.sha256(body).hexdigest()
    assert calls == ["HeadObject", "PutObject"]
    assert_stored(s3, out, body, job_id, url)


def test_large_output_goes_up_in_parts(
    files: FileServer, archiver: Archiver, s3: S3Client, calls: list[str], http: httpx.Client
) -> None:
    size = 40 * MIB + 12_345
    body = content(size, seed=2)
    # No suffix in the URL and no Content-Length: the type decides the extension, the stream
    # decides when to switch to multipart.
    url = files.add(
        "render", Route(size=size, seed=2, content_type="image/webp", framing="chunked")
    )
    job_id = new_job()

    out = archive(archiver, job_id, url)

    assert out.key == f"runcomfy/{job_id}/0.webp"
    assert out.content_type == "image/webp"
    assert out.bytes == size
    assert out.sha256 == hashlib.sha256(body).hexdigest()
    parts = -(-size // (8 * MIB))
    assert calls == [
        "HeadObject",  # at 0.png: where the URL alone said it would be
        "HeadObject",  # at 0.webp, once the Content-Type was known
        "CreateMultipartUpload",
        *["UploadPart"] * parts,
        "CompleteMultipartUpload",
        "CopyObject",
    ]
    assert_stored(s3, out, body, job_id, url)
    assert uploads_under(s3, f"runcomfy/{job_id}/") == []
    assert out.url is not None
    assert http.get(out.url).content == body


def test_exactly_one_part_is_still_a_single_put(
    files: FileServer, s3: S3Client, settings: S3Settings, http: httpx.Client, calls: list[str]
) -> None:
    small_parts = replace_part_size(settings, 5 * MIB)
    archiver = Archiver(s3, small_parts, http)
    body = content(5 * MIB, seed=3)
    url = files.add("one.jpg", Route(size=len(body), seed=3, content_type=None, framing="close"))
    job_id = new_job()

    out = archive(archiver, job_id, url)

    assert calls == ["HeadObject", "PutObject"]
    assert out.key.endswith("/0.jpg")
    assert out.content_type == "image/jpeg"  # none upstream: guessed from the extension
    assert_stored(s3, out, body, job_id, url)


def test_one_byte_over_a_part_uses_multipart(
    files: FileServer, s3: S3Client, settings: S3Settings, http: httpx.Client, calls: list[str]
) -> None:
    small_parts = replace_part_size(settings, 5 * MIB)
    archiver = Archiver(s3, small_parts, http)
    body = content(5 * MIB + 1, seed=4)
    url = files.add("v.mp4", Route(size=len(body), seed=4, content_type="video/mp4"))
    job_id = new_job()

    out = archive(archiver, job_id, url, kind=OutputKind.VIDEO)

    assert calls.count("UploadPart") == 2
    assert out.key.endswith("/0.mp4")
    assert_stored(s3, out, body, job_id, url)


# -- redelivery -------------------------------------------------------------------------------


def test_redelivery_skips_the_download(
    files: FileServer, archiver: Archiver, s3: S3Client, calls: list[str]
) -> None:
    size = 9 * MIB  # multipart, so the metadata came from the copy onto itself
    url = files.add("again.png", Route(size=size, seed=5))
    job_id = new_job()

    first = archive(archiver, job_id, url)
    calls.clear()
    second = archive(archiver, job_id, url)

    assert files.gets(url) == 1
    assert calls == ["HeadObject"]
    assert second.model_dump(exclude={"url"}) == first.model_dump(exclude={"url"})
    assert second.url is not None


def test_a_fresh_archive_uploads_without_looking_for_a_copy(
    files: FileServer, archiver: Archiver, s3: S3Client, calls: list[str]
) -> None:
    url = files.add("noext", Route(size=1000, seed=10, content_type="image/jpeg"))
    job_id = new_job()

    out = archiver.archive_one(
        job_id=job_id, request_id="req-123", index=0, kind=OutputKind.IMAGE, source_url=url,
        fresh=True,
    )  # fmt: skip

    assert "HeadObject" not in calls
    assert calls == ["PutObject"]
    assert out.key.endswith("/0.jpg")
    assert_stored(s3, out, content(1000, seed=10), job_id, url)
    # A later run is not fresh: it finds that copy.
    calls.clear()
    again = archive(archiver, job_id, url)
    assert calls == ["HeadObject", "HeadObject"]
    assert again.sha256 == out.sha256


def test_redelivery_finds_a_copy_whose_extension_came_from_the_content_type(
    files: FileServer, archiver: Archiver, calls: list[str]
) -> None:
    url = files.add("noext", Route(size=1000, seed=6, content_type="image/jpeg"))
    job_id = new_job()

    first = archive(archiver, job_id, url)
    calls.clear()
    second = archive(archiver, job_id, url)

    # The second GET is closed after its headers; nothing is uploaded again.
    assert calls == ["HeadObject", "HeadObject"]
    assert second.key == first.key
    assert second.sha256 == first.sha256


def test_an_object_from_another_source_is_replaced(
    files: FileServer, archiver: Archiver, s3: S3Client
) -> None:
    job_id = new_job()
    old = files.add("x.png", Route(size=1000, seed=7))
    new = files.add("x.png", Route(size=2000, seed=8))

    archive(archiver, job_id, old)
    out = archive(archiver, job_id, new)

    assert files.gets(new) == 1
    assert_stored(s3, out, content(2000, seed=8), job_id, new)


def test_long_source_urls_fit_the_metadata_limit_and_still_match(
    files: FileServer, archiver: Archiver, s3: S3Client
) -> None:
    url = files.add("long.png", Route(size=1000, seed=9)) + "?sig=" + "a" * 3000
    job_id = new_job()

    out = archive(archiver, job_id, url)
    again = archive(archiver, job_id, url)

    assert files.gets(url) == 1
    assert again.sha256 == out.sha256
    meta = s3.head_object(Bucket=BUCKET, Key=out.key)["Metadata"]
    assert sum(len(k) + len(v) for k, v in meta.items()) <= 2048
    assert url.startswith(meta["source-url"])


# -- download failures ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(404, False), (410, False), (403, False), (500, True), (503, True), (429, True)],
)
def test_http_errors_are_classified(
    files: FileServer, archiver: Archiver, s3: S3Client, status: int, retryable: bool
) -> None:
    url = files.add("gone.png", Route(status=status))
    job_id = new_job()

    with pytest.raises(DownloadError) as caught:
        archive(archiver, job_id, url)

    assert caught.value.retryable is retryable
    assert caught.value.status_code == status
    assert not isinstance(caught.value, OutputTooLargeError)
    assert keys_under(s3, f"runcomfy/{job_id}/") == []


def test_connection_refused_is_retryable(archiver: Archiver) -> None:
    url = f"http://127.0.0.1:{free_port()}/x.png"

    with pytest.raises(DownloadError) as caught:
        archive(archiver, new_job(), url)

    assert caught.value.retryable is True
    assert caught.value.status_code is None


def test_a_stalled_download_times_out_and_aborts_the_upload(
    files: FileServer, s3: S3Client, settings: S3Settings
) -> None:
    small_parts = replace_part_size(settings, 5 * MIB)
    url = files.add("slow.png", Route(size=20 * MIB, stall_after=11 * MIB))
    job_id = new_job()

    with (
        httpx.Client(timeout=httpx.Timeout(10.0, read=0.5)) as http,
        pytest.raises(DownloadError) as caught,
    ):
        archive(Archiver(s3, small_parts, http), job_id, url)

    assert caught.value.retryable is True
    assert keys_under(s3, f"runcomfy/{job_id}/") == []
    assert uploads_under(s3, f"runcomfy/{job_id}/") == []


# -- the total deadline -----------------------------------------------------------------------


def test_downloads_share_one_watchdog_thread(files: FileServer, archiver: Archiver) -> None:
    for i in range(3):
        archive(archiver, new_job(), files.add(f"w{i}.png", Route(size=1000, seed=20 + i)))
    names = [thread.name for thread in threading.enumerate()]
    assert names.count("download-deadlines") == 1


def test_a_trickling_download_stops_at_the_total_deadline(
    files: FileServer, s3: S3Client, settings: S3Settings
) -> None:
    # 100 bytes a second: every read is quick, so only a total deadline ends it.
    url = files.add("trickle.png", Route(size=100_000, write_size=1, pause_s=0.01))
    job_id = new_job()
    started = time.monotonic()

    with (
        httpx.Client(timeout=httpx.Timeout(5.0)) as http,
        pytest.raises(DownloadError, match=r"took longer than 0\.4 s") as caught,
    ):
        archive(Archiver(s3, settings, http, download_deadline_s=0.4), job_id, url)

    assert 0.35 < time.monotonic() - started < 1.5
    assert caught.value.retryable is True
    assert not isinstance(caught.value, OutputTooLargeError)
    assert keys_under(s3, f"runcomfy/{job_id}/") == []


def test_the_deadline_defaults_to_the_clients_read_timeout(
    files: FileServer, s3: S3Client, settings: S3Settings
) -> None:
    # As the runtime builds it: RUNCOMFY_DOWNLOAD_TIMEOUT_S is the download client's read
    # timeout, and so the whole file's deadline.
    url = files.add("trickle.png", Route(size=100_000, write_size=1, pause_s=0.01))

    with (
        httpx.Client(timeout=httpx.Timeout(5.0, read=0.4)) as http,
        pytest.raises(DownloadError, match=r"took longer than 0\.4 s") as caught,
    ):
        archive(Archiver(s3, settings, http), new_job(), url)

    assert caught.value.retryable is True


def test_a_read_blocked_on_a_silent_server_ends_at_the_deadline(
    files: FileServer, s3: S3Client, settings: S3Settings
) -> None:
    # Headers, then silence: the per-read timeout (10 s) would only end it much later.
    url = files.add("silent.png", Route(size=MIB, stall_after=1000, write_size=1000))
    started = time.monotonic()

    with (
        httpx.Client(timeout=httpx.Timeout(10.0)) as http,
        pytest.raises(DownloadError, match=r"took longer than 0\.4 s") as caught,
    ):
        archive(Archiver(s3, settings, http, download_deadline_s=0.4), new_job(), url)

    assert time.monotonic() - started < 1.5
    assert caught.value.retryable is True


def test_time_spent_in_s3_is_not_charged_to_the_download(
    files: FileServer, s3: S3Client, settings: S3Settings
) -> None:
    body = content(12 * MIB, seed=21)
    url = files.add("slow-s3.png", Route(size=len(body), seed=21))
    job_id = new_job()

    def slow_part(**_: Any) -> None:
        time.sleep(0.3)

    s3.meta.events.register("before-call.s3.UploadPart", slow_part)
    try:
        with httpx.Client(timeout=httpx.Timeout(5.0)) as http:
            archiver = Archiver(
                s3, replace_part_size(settings, 5 * MIB), http, download_deadline_s=0.5
            )
            out = archive(archiver, job_id, url)
    finally:
        s3.meta.events.unregister("before-call.s3.UploadPart", slow_part)

    assert_stored(s3, out, body, job_id, url)


# -- content encodings: decoded in bounded steps, limits counted after decoding --------------


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda data: zlib.compress(data, wbits=-zlib.MAX_WBITS)),  # headerless
        ("gzip, gzip", lambda data: gzip.compress(gzip.compress(data))),
        ("identity", lambda data: data),
    ],
)
def test_encoded_bodies_are_stored_decoded(
    files: FileServer,
    archiver: Archiver,
    s3: S3Client,
    encoding: str,
    compress: Callable[[bytes], bytes],
) -> None:
    body = content(300_000, seed=22)
    url = files.add("enc.png", Route(encoded_body=compress(body), content_encoding=encoding))
    job_id = new_job()

    out = archive(archiver, job_id, url)

    assert_stored(s3, out, body, job_id, url)


def test_a_gzip_bomb_stops_at_the_limit_after_decoding(
    files: FileServer, archiver: Archiver, s3: S3Client, calls: list[str]
) -> None:
    bomb = gzip.compress(bytes(MAX_IMAGE_BYTES + MIB), compresslevel=9)
    assert len(bomb) < MIB // 10  # far under the limit as sent
    url = files.add("bomb.png", Route(encoded_body=bomb, content_encoding="gzip"))
    job_id = new_job()

    with pytest.raises(OutputTooLargeError, match="over the 50 MiB limit") as caught:
        archive(archiver, job_id, url)

    assert caught.value.retryable is False
    # Decoded a step at a time (not 51 MiB in one go): parts went up, then were aborted.
    assert calls[-1] == "AbortMultipartUpload"
    assert keys_under(s3, f"runcomfy/{job_id}/") == []
    assert uploads_under(s3, f"runcomfy/{job_id}/") == []


def test_a_corrupt_gzip_body_is_a_permanent_download_error(
    files: FileServer, archiver: Archiver
) -> None:
    url = files.add("bad.png", Route(encoded_body=b"not gzip at all", content_encoding="gzip"))

    with pytest.raises(DownloadError, match="corrupt gzip body") as caught:
        archive(archiver, new_job(), url)

    assert caught.value.retryable is False


def test_the_ssrf_guard_error_passes_through(s3: S3Client, settings: S3Settings) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise TargetForbiddenError(f"{request.url.host} is private")

    with (
        httpx.Client(transport=httpx.MockTransport(refuse)) as http,
        pytest.raises(TargetForbiddenError, match="is private"),
    ):
        archive(Archiver(s3, settings, http), new_job(), "http://10.0.0.1/x.png")


# -- size limits ------------------------------------------------------------------------------


def test_too_large_by_content_length_is_refused_before_reading(
    files: FileServer, archiver: Archiver, s3: S3Client, calls: list[str]
) -> None:
    url = files.add("huge.png", Route(size=1000, declared_length=MAX_IMAGE_BYTES + 1))
    job_id = new_job()

    with pytest.raises(OutputTooLargeError) as caught:
        archive(archiver, job_id, url)

    assert caught.value.retryable is False
    assert calls == ["HeadObject"]
    assert keys_under(s3, f"runcomfy/{job_id}/") == []


def test_too_large_by_stream_stops_and_aborts_the_upload(
    files: FileServer, archiver: Archiver, s3: S3Client, calls: list[str]
) -> None:
    url = files.add("endless.png", Route(size=MAX_IMAGE_BYTES + 1, framing="chunked"))
    job_id = new_job()

    with pytest.raises(OutputTooLargeError):
        archive(archiver, job_id, url)

    assert "UploadPart" in calls
    assert calls[-1] == "AbortMultipartUpload"
    assert keys_under(s3, f"runcomfy/{job_id}/") == []
    assert uploads_under(s3, f"runcomfy/{job_id}/") == []


def test_videos_have_the_larger_limit(
    files: FileServer, archiver: Archiver, s3: S3Client, calls: list[str]
) -> None:
    url = files.add("clip.mp4", Route(size=1000, declared_length=MAX_IMAGE_BYTES + 1))
    with pytest.raises(OutputTooLargeError):
        archive(archiver, new_job(), url, kind=OutputKind.IMAGE)
    # The same declared size is fine for a video (the server then sends less: a protocol error).
    with pytest.raises(DownloadError) as caught:
        archive(archiver, new_job(), url, kind=OutputKind.VIDEO)
    assert not isinstance(caught.value, OutputTooLargeError)
    assert caught.value.retryable is True


# -- S3 failures ------------------------------------------------------------------------------


def test_s3_down_is_a_storage_error(files: FileServer, http: httpx.Client) -> None:
    down = S3Settings(
        bucket=BUCKET, endpoint_url=f"http://127.0.0.1:{free_port()}", region=EmbeddedS3.REGION
    )
    url = files.add("x.png", Route(size=1000))
    s3 = make_s3_client(down)
    try:
        archiver = Archiver(s3, down, http)
        with pytest.raises(StorageError, match="HeadObject"):
            archive(archiver, new_job(), url)
        with pytest.raises(StorageError, match="HeadBucket"):
            archiver.check_bucket()
    finally:
        s3.close()
    assert files.gets(url) == 0  # S3 is checked before anything is downloaded


def test_missing_bucket(
    files: FileServer, s3_server: EmbeddedS3, settings: S3Settings, http: httpx.Client
) -> None:
    missing = settings.model_copy(update={"bucket": "archive-missing"})
    s3 = make_s3_client(missing)
    try:
        archiver = Archiver(s3, missing, http)
        with pytest.raises(StorageError, match="does not exist"):
            archiver.check_bucket()
        with pytest.raises(StorageError, match="NoSuchBucket"):
            archive(archiver, new_job(), files.add("x.png", Route(size=1000)))
    finally:
        s3.close()


def test_existing_bucket_passes_the_check(archiver: Archiver) -> None:
    archiver.check_bucket()


class _Raw:
    """Just enough of a urllib3 response for botocore to read an error body."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, *_: Any, **__: Any) -> Iterator[bytes]:
        yield self._body


def test_endpoints_that_refuse_checksums_get_uploads_without_them(
    files: FileServer, s3: S3Client, settings: S3Settings, http: httpx.Client, calls: list[str]
) -> None:
    refused: list[str] = []

    def refuse_checksums(request: AWSPreparedRequest, **_: Any) -> Any:
        if any(name.lower().startswith("x-amz-checksum") for name in request.headers):
            refused.append(request.method)
            error = b"<Error><Code>NotImplemented</Code><Message>no</Message></Error>"
            return AWSResponse(request.url, 501, HTTPHeaders(), _Raw(error))
        return None

    archiver = Archiver(s3, replace_part_size(settings, 5 * MIB), http)
    small = files.add("s.png", Route(size=1000, seed=10))
    large = files.add("l.png", Route(size=6 * MIB, seed=11))
    large_job = new_job()

    s3.meta.events.register("before-send.s3", refuse_checksums)
    try:
        small_out = archive(archiver, new_job(), small)
        large_out = archive(archiver, large_job, large)
    finally:
        s3.meta.events.unregister("before-send.s3", refuse_checksums)

    assert refused == ["PUT"]  # refused once; never offered again
    assert calls.count("PutObject") == 2
    assert_stored(s3, small_out, content(1000, seed=10), small_out.key.split("/")[1], small)
    assert_stored(s3, large_out, content(6 * MIB, seed=11), large_job, large)


def replace_part_size(settings: S3Settings, part_size: int) -> S3Settings:
    return settings.model_copy(update={"part_size_bytes": part_size})
