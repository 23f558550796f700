"""Copy upstream outputs into S3: stream, hash and upload one part at a time, idempotently.

Upstream output URLs expire, so each output is copied promptly to a deterministic key
``<prefix><job_id>/<index>.<ext>``. The body is never held whole: it is read from the HTTP
response into one part-sized buffer, hashed on the way, and sent as a single ``PutObject``
(bodies up to one part) or as a multipart upload (larger ones). Running ``archive_one`` twice
for the same output finds the first copy by its metadata and returns it without downloading.

A download has a total deadline besides the client's per-read timeouts, so a server that
trickles bytes cannot hold a worker; and the size limit counts bytes after content decoding,
which is done here in bounded steps so a small gzip body cannot expand in memory at once.

Errors are classified here, once: download failures become :class:`DownloadError` (retryable
or not; a download over its deadline is retryable), oversized outputs
:class:`OutputTooLargeError`, and every S3 failure :class:`StorageError`.
:class:`TargetForbiddenError` from the caller's SSRF-guarded client passes through untouched.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import logging
import os
import posixpath
import re
import socket
import threading
import time
import zlib
from typing import TYPE_CHECKING, Final, Literal
from urllib.parse import quote, urlsplit

import boto3
import httpx
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from api_contracts.jobs import ArchivedOutput, OutputKind
from worker.constants import MAX_IMAGE_BYTES, MAX_VIDEO_BYTES
from worker.errors import DownloadError, OutputTooLargeError, StorageError
from worker.settings import RunComfySettings, S3Settings

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from _typeshed import WriteableBuffer
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef
    from typing_extensions import TypedDict

    # Closed (no other keys) so that strict mypy lets it be spread into a CompletedPartTypeDef.
    class _ChecksumArgs(TypedDict, total=False, closed=True):
        ChecksumSHA256: str

    class _ChecksumAlgorithmArgs(TypedDict, total=False):
        ChecksumAlgorithm: Literal["SHA256"]


__all__ = [
    "MAX_IMAGE_BYTES",
    "MAX_VIDEO_BYTES",
    "Archiver",
    "extension_for",
    "make_s3_client",
    "max_bytes_for",
    "object_key",
]

log = logging.getLogger(__name__)

#: S3 caps user metadata at 2 KB, counted as the UTF-8 bytes of every key and value.
S3_METADATA_MAX_BYTES: Final = 2048

_EXT_FOR_MEDIA_TYPE: Final = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/jpg": "jpg",
    "image/pjpeg": "jpg",
    "image/webp": "webp",
    "image/gif": "gif",
    "video/mp4": "mp4",
    "video/webm": "webm",
    "video/quicktime": "mov",
}
_EXT_FOR_SUFFIX: Final = {
    "png": "png",
    "jpg": "jpg",
    "jpeg": "jpg",
    "webp": "webp",
    "gif": "gif",
    "mp4": "mp4",
    "webm": "webm",
    "mov": "mov",
}
_MEDIA_TYPE_FOR_EXT: Final = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
    "mp4": "video/mp4",
    "webm": "video/webm",
    "mov": "video/quicktime",
}
_DEFAULT_EXT: Final = {OutputKind.IMAGE: "png", OutputKind.VIDEO: "mp4"}
# Storage servers that do not know the type say so with these; we would rather guess from the
# extension than store a type browsers refuse to display.
_GENERIC_MEDIA_TYPES: Final = frozenset({"application/octet-stream", "binary/octet-stream"})
_CONTENT_TYPE_OK: Final = re.compile(r"^[\x21-\x7e][\x20-\x7e]{0,254}$")
_SHA256_HEX: Final = re.compile(r"^[0-9a-f]{64}$")
# Characters a URL may keep in an HTTP header value; anything else is percent-encoded so that
# metadata stays printable ASCII (no header injection, no mojibake across S3 implementations).
_URL_SAFE: Final = "!#$&'()*+,/:;=?@[]~%-._"
# Error codes with which S3-compatible servers refuse the x-amz-checksum-* headers.
_CHECKSUM_REFUSED: Final = frozenset({"NotImplemented", "InvalidArgument", "InvalidRequest"})
_NOT_FOUND_STATUSES: Final = frozenset({403, 404, 410})
#: A download's total deadline when neither the caller nor the HTTP client sets one.
DEFAULT_DOWNLOAD_DEADLINE_S: Final[float] = RunComfySettings.model_fields[
    "download_timeout_s"
].default
# Asked for explicitly: httpx would otherwise advertise whatever decoders happen to be
# installed (br, zstd), and only these are decoded here.
_ACCEPT_ENCODING: Final = "gzip, deflate"
_ZLIB_WBITS: Final = {
    "gzip": 16 + zlib.MAX_WBITS,
    "x-gzip": 16 + zlib.MAX_WBITS,
    "deflate": zlib.MAX_WBITS,
}
# Most bytes one decompression step may produce. Deflate expands up to ~1000:1 and codings
# stack ("gzip, gzip"), so decoding a whole network read at once could need gigabytes.
_DECODE_STEP: Final = 256 * 1024


def object_key(prefix: str, job_id: str, index: int, ext: str) -> str:
    """The S3 key of output ``index`` of ``job_id``: ``<prefix><job_id>/<index>.<ext>``."""
    return f"{prefix}{job_id}/{index}.{ext}"


def extension_for(content_type: str | None, kind: OutputKind, url: str) -> str:
    """File extension from the Content-Type, else the URL path's suffix, else png/mp4 by kind."""
    if content_type:
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type in _EXT_FOR_MEDIA_TYPE:
            return _EXT_FOR_MEDIA_TYPE[media_type]
    try:
        path = urlsplit(url).path
    except ValueError:
        path = ""
    suffix = posixpath.splitext(path)[1].lstrip(".").lower()
    return _EXT_FOR_SUFFIX.get(suffix, _DEFAULT_EXT[kind])


def max_bytes_for(kind: OutputKind) -> int:
    """The documented upstream size limit for an output of this kind."""
    return MAX_VIDEO_BYTES if kind is OutputKind.VIDEO else MAX_IMAGE_BYTES


def make_s3_client(settings: S3Settings) -> S3Client:
    """A boto3 S3 client for ``settings``; credentials come from boto3's standard chain."""
    config = Config(
        # Presigned URLs must be SigV4: R2 and newer AWS regions accept nothing else.
        signature_version="s3v4",
        # Few, quick in-client retries: the task's own retry window covers longer outages.
        retries={"mode": "standard", "total_max_attempts": 3},
        max_pool_connections=16,
        connect_timeout=5,
        read_timeout=60,
        tcp_keepalive=True,
        # MinIO, moto and most self-hosted endpoints have no wildcard DNS for bucket hosts.
        s3={"addressing_style": "path" if settings.endpoint_url else "auto"},
        # We send our own SHA-256 checksums; botocore's automatic CRC32 (default since 1.36)
        # would be redundant and is refused by several S3-compatible servers.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    # A fresh Session per client: boto3's default session is not safe to share across threads.
    session = boto3.session.Session()
    return session.client(
        "s3", endpoint_url=settings.endpoint_url, region_name=settings.region, config=config
    )


class Archiver:
    """Streams upstream outputs into one S3 bucket and presigns them."""

    def __init__(
        self,
        s3: S3Client,
        settings: S3Settings,
        http: httpx.Client,
        *,
        download_deadline_s: float | None = None,
    ) -> None:
        self._s3 = s3
        self._settings = settings
        self._bucket = settings.bucket
        self._http = http
        # The runtime's download client has RUNCOMFY_DOWNLOAD_TIMEOUT_S as its read timeout;
        # that setting is documented as the time one file may take, so it is the deadline.
        if download_deadline_s is None:
            download_deadline_s = http.timeout.read or DEFAULT_DOWNLOAD_DEADLINE_S
        if not download_deadline_s > 0:
            raise ValueError(f"download_deadline_s must be positive, not {download_deadline_s}")
        self._deadline_s = download_deadline_s
        # Flipped off the first time the endpoint refuses x-amz-checksum-sha256.
        self._checksums = True

    def archive_one(
        self,
        *,
        job_id: str,
        request_id: str,
        index: int,
        kind: OutputKind,
        source_url: str,
        fresh: bool = False,
    ) -> ArchivedOutput:
        """Copy one output to S3 (or find the copy a previous delivery made) and describe it.

        ``fresh``: the caller knows no earlier attempt for this job can have stored anything
        (its first archive run), so the HEADs looking for a copy are skipped.
        """
        # The Content-Type that decides the extension is only known after the GET starts, so
        # look first where the URL says the copy would be; most URLs end in the real suffix.
        guessed_key = object_key(
            self._settings.prefix, job_id, index, extension_for(None, kind, source_url)
        )
        if not fresh:
            found = self._find_existing(guessed_key, job_id, index, kind, source_url)
            if found is not None:
                return found
        limit = max_bytes_for(kind)
        shown_url = _redact(source_url)
        deadline = _Deadline(self._deadline_s, shown_url)
        try:
            with (
                self._http.stream(
                    "GET", source_url, headers={"Accept-Encoding": _ACCEPT_ENCODING}
                ) as response,
                deadline.watching(response),
            ):
                _check_response(response, shown_url, limit)
                upstream_type = _clean_content_type(response.headers.get("content-type"))
                ext = extension_for(upstream_type, kind, source_url)
                key = object_key(self._settings.prefix, job_id, index, ext)
                if key != guessed_key and not fresh:
                    # The body is not read yet: closing the response costs only the headers.
                    with deadline.paused():
                        found = self._find_existing(key, job_id, index, kind, source_url)
                    if found is not None:
                        return found
                content_type = upstream_type or _MEDIA_TYPE_FOR_EXT[ext]
                metadata = _metadata(
                    job_id=job_id,
                    request_id=request_id,
                    source_url=source_url,
                    kind=kind,
                    index=index,
                )
                size, sha256 = self._upload(
                    response,
                    deadline,
                    key=key,
                    content_type=content_type,
                    metadata=metadata,
                    limit=limit,
                    shown_url=shown_url,
                )
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            if deadline.expired:
                raise deadline.error() from exc
            raise _download_error(exc, shown_url) from exc
        log.info("archived %s (%d bytes) to s3://%s/%s", shown_url, size, self._bucket, key)
        return self._describe(
            kind=kind,
            index=index,
            source_url=source_url,
            key=key,
            size=size,
            sha256=sha256,
            content_type=content_type,
        )

    def presign(self, key: str) -> str:
        """A presigned GET URL for ``key``, valid for ``presign_ttl_s``.

        With temporary credentials (instance roles, SSO) the URL stops working when they
        expire, even if the TTL is longer.
        """
        try:
            return self._s3.generate_presigned_url(
                "get_object",
                Params={"Bucket": self._bucket, "Key": key},
                ExpiresIn=self._settings.presign_ttl_s,
            )
        except (BotoCoreError, ClientError) as exc:
            raise _storage_error("presign", self._bucket, key, exc) from exc

    def check_bucket(self) -> None:
        """Fail with a clear StorageError unless the bucket exists and we may use it."""
        try:
            self._s3.head_bucket(Bucket=self._bucket)
        except ClientError as exc:
            status = _http_status(exc)
            if status == 404:
                raise StorageError(f"S3 bucket {self._bucket!r} does not exist") from exc
            if status == 403:
                raise StorageError(
                    f"access to S3 bucket {self._bucket!r} is forbidden: "
                    "check the worker's credentials and bucket policy"
                ) from exc
            raise _storage_error("HeadBucket", self._bucket, None, exc) from exc
        except BotoCoreError as exc:
            raise _storage_error("HeadBucket", self._bucket, None, exc) from exc

    # -- internals -------------------------------------------------------------------------

    def _describe(
        self,
        *,
        kind: OutputKind,
        index: int,
        source_url: str,
        key: str,
        size: int,
        sha256: str,
        content_type: str,
    ) -> ArchivedOutput:
        return ArchivedOutput(
            kind=kind,
            index=index,
            source_url=source_url,
            s3_uri=f"s3://{self._bucket}/{key}",
            bucket=self._bucket,
            key=key,
            bytes=size,
            sha256=sha256,
            content_type=content_type,
            url=self.presign(key),
        )

    def _find_existing(
        self, key: str, job_id: str, index: int, kind: OutputKind, source_url: str
    ) -> ArchivedOutput | None:
        """The complete copy a previous delivery left at ``key``, or None."""
        try:
            head = self._s3.head_object(Bucket=self._bucket, Key=key)
        except ClientError as exc:
            # AWS answers 403 rather than 404 for a missing key when the worker may not
            # ListBucket; the upload that follows reports a real permission problem.
            if _http_status(exc) in (403, 404):
                return None
            raise _storage_error("HeadObject", self._bucket, key, exc) from exc
        except BotoCoreError as exc:
            raise _storage_error("HeadObject", self._bucket, key, exc) from exc
        meta = head.get("Metadata", {})
        sha256 = meta.get("sha256", "")
        size = meta.get("bytes", "")
        if not (
            meta.get("source-url-sha256") == _digest(source_url)
            and meta.get("job-id") == job_id
            and meta.get("kind") == kind.value
            and meta.get("index") == str(index)
            and _SHA256_HEX.match(sha256)
            and size.isdigit()
            and int(size) == head.get("ContentLength")
        ):
            return None
        log.info("s3://%s/%s already archived; skipping the download", self._bucket, key)
        return self._describe(
            kind=kind,
            index=index,
            source_url=source_url,
            key=key,
            size=int(size),
            sha256=sha256,
            content_type=head.get("ContentType") or _MEDIA_TYPE_FOR_EXT[_key_ext(key, kind)],
        )

    def _upload(
        self,
        response: httpx.Response,
        deadline: _Deadline,
        *,
        key: str,
        content_type: str,
        metadata: dict[str, str],
        limit: int,
        shown_url: str,
    ) -> tuple[int, str]:
        """Stream the (decoded) response body to ``key``; returns (size, sha256 hex)."""
        part_size = self._settings.part_size_bytes
        whole = hashlib.sha256()
        total = 0
        # Sized from Content-Length when known (no over-allocation), else grown while the first
        # part fills; then reused in place. Resizing a bytearray is only allowed while no
        # memoryview of it is alive, and none is until the first upload, after which writes
        # never pass its end.
        declared = response.headers.get("content-length", "")
        buf = bytearray(min(part_size, int(declared)) if declared.isdigit() else 0)
        filled = 0
        upload: _MultipartUpload | None = None
        try:
            for chunk in _decoded(response, deadline, shown_url):
                total += len(chunk)
                if total > limit:
                    raise OutputTooLargeError(
                        f"{shown_url} is over the {limit // (1024 * 1024)} MiB limit "
                        f"(stopped after {total} bytes)"
                    )
                whole.update(chunk)
                view = memoryview(chunk)
                while view:
                    # Only flush a full part once more data proves it is not the last one, so
                    # that a body of exactly one part still goes as a single PutObject.
                    if filled == part_size:
                        with deadline.paused():
                            if upload is None:
                                upload = self._start_multipart(key, content_type, metadata)
                            upload.send(memoryview(buf)[:filled])
                        filled = 0
                    take = min(len(view), part_size - filled)
                    if filled + take > len(buf):
                        buf += view[:take]
                    else:
                        buf[filled : filled + take] = view[:take]
                    filled += take
                    view = view[take:]
            # The body is in: the connection may go back to the pool, so it must not be cut.
            deadline.stop()
            if total == 0:
                raise DownloadError(f"{shown_url} served an empty body", retryable=True)
            sha256 = whole.hexdigest()
            final_metadata = {**metadata, "sha256": sha256, "bytes": str(total)}
            if upload is None:
                self._put(
                    key, memoryview(buf)[:filled], content_type, final_metadata, whole.digest()
                )
            else:
                upload.send(memoryview(buf)[:filled])
                etag = upload.complete()
                # Completed: nothing left to abort. If stamping fails, the object merely lacks
                # sha256 and the retry re-archives it.
                upload = None
                self._stamp_metadata(key, etag, content_type, final_metadata)
        except BaseException:
            if upload is not None:
                upload.abort()
            raise
        return total, sha256

    def _put(
        self,
        key: str,
        body: memoryview,
        content_type: str,
        metadata: dict[str, str],
        digest: bytes,
    ) -> None:
        """Upload a body of at most one part with a single PutObject."""
        for with_checksum in (True, False) if self._checksums else (False,):
            try:
                with _body(body) as reader:
                    self._s3.put_object(
                        Bucket=self._bucket,
                        Key=key,
                        Body=reader,
                        ContentType=content_type,
                        Metadata=metadata,
                        **_checksum_args(digest if with_checksum else None),
                    )
                return
            except ClientError as exc:
                if with_checksum and _error_code(exc) in _CHECKSUM_REFUSED:
                    self._checksums_refused(exc)
                    continue
                raise _storage_error("PutObject", self._bucket, key, exc) from exc
            except BotoCoreError as exc:
                raise _storage_error("PutObject", self._bucket, key, exc) from exc

    def _start_multipart(
        self, key: str, content_type: str, metadata: dict[str, str]
    ) -> _MultipartUpload:
        for with_checksum in (True, False) if self._checksums else (False,):
            try:
                created = self._s3.create_multipart_upload(
                    Bucket=self._bucket,
                    Key=key,
                    ContentType=content_type,
                    Metadata=metadata,
                    **_checksum_algorithm_args(with_checksum),
                )
            except ClientError as exc:
                if with_checksum and _error_code(exc) in _CHECKSUM_REFUSED:
                    self._checksums_refused(exc)
                    continue
                raise _storage_error("CreateMultipartUpload", self._bucket, key, exc) from exc
            except BotoCoreError as exc:
                raise _storage_error("CreateMultipartUpload", self._bucket, key, exc) from exc
            return _MultipartUpload(
                self._s3, self._bucket, key, created["UploadId"], checksums=with_checksum
            )
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _stamp_metadata(
        self, key: str, etag: str, content_type: str, metadata: dict[str, str]
    ) -> None:
        """Add the now-known sha256 and size to a completed multipart object.

        S3 takes metadata only when an upload starts, before the hash is known. Alternatives
        were weighed: object tags (not on R2, an extra request on every check), a sidecar
        object (two objects to keep consistent) or a temporary key copied to the final one
        (an extra key to clean up). A copy onto itself with MetadataDirective=REPLACE works
        on AWS, MinIO, R2 and moto, is server-side (no bytes through the worker, ≤ 100 MB is
        far below CopyObject's 5 GB limit), and until it lands the object simply lacks
        ``sha256``, so a redelivery in that window re-archives instead of trusting it.
        CopySourceIfMatch makes sure we stamp the bytes we uploaded and not a concurrent
        writer's.
        """
        try:
            if etag:
                self._s3.copy_object(
                    Bucket=self._bucket,
                    Key=key,
                    CopySource={"Bucket": self._bucket, "Key": key},
                    CopySourceIfMatch=etag,
                    MetadataDirective="REPLACE",
                    ContentType=content_type,
                    Metadata=metadata,
                )
            else:
                self._s3.copy_object(
                    Bucket=self._bucket,
                    Key=key,
                    CopySource={"Bucket": self._bucket, "Key": key},
                    MetadataDirective="REPLACE",
                    ContentType=content_type,
                    Metadata=metadata,
                )
        except (BotoCoreError, ClientError) as exc:
            raise _storage_error("CopyObject", self._bucket, key, exc) from exc

    def _checksums_refused(self, exc: ClientError) -> None:
        log.warning(
            "S3 endpoint refused x-amz-checksum-sha256 (%s); uploading without checksums",
            _error_code(exc),
        )
        self._checksums = False


class _Watchdog:
    """One thread per process that watches every download's :class:`_Deadline`.

    A thread per download cost a thread start and a join on every archived output (about
    0.1 ms of CPU, more in context switches under the threads pool); one long-lived thread,
    woken when a deadline is added, paused, resumed or stopped, does the same job. Its
    condition is shared with every deadline, so a deadline's state only changes under it and
    a stopped deadline is never acted on afterwards."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self._active: set[_Deadline] = set()
        self._thread: threading.Thread | None = None

    def add(self, deadline: _Deadline) -> None:
        """Watch ``deadline`` until it is stopped (the thread starts on first use)."""
        with self.cond:
            self._active.add(deadline)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="download-deadlines", daemon=True
                )
                self._thread.start()
            self.cond.notify_all()

    def discard(self, deadline: _Deadline) -> None:
        """Stop watching ``deadline``."""
        with self.cond:
            self._active.discard(deadline)

    def _run(self) -> None:
        with self.cond:
            while True:
                now = time.monotonic()
                wait: float | None = None
                for deadline in list(self._active):
                    left = deadline._due_in(now)
                    if left is None:
                        continue
                    if left <= 0:
                        deadline._fire()
                        self._active.discard(deadline)
                    elif wait is None or left < wait:
                        wait = left
                self.cond.wait(wait)

    def _after_fork(self) -> None:
        """In a forked child: a fresh lock and no thread (the parent's is not there)."""
        self.cond = threading.Condition()
        self._active = set()
        self._thread = None


_WATCHDOG: Final = _Watchdog()
os.register_at_fork(after_in_child=_WATCHDOG._after_fork)


class _Deadline:
    """The total time one download may take, S3 calls made meanwhile not counted.

    While the body is read, the process's watchdog thread (:class:`_Watchdog`) shuts the
    connection's socket down when time runs out: a read blocked on a silent server then
    ends at once, not after the client's per-read timeout.
    """

    def __init__(self, seconds: float, shown_url: str) -> None:
        self.seconds = seconds
        self._shown_url = shown_url
        self._cond = _WATCHDOG.cond
        self._ends = time.monotonic() + seconds
        self._paused_since: float | None = None
        self._socket: socket.socket | None = None
        self._expired = False
        self._stopped = False

    @property
    def expired(self) -> bool:
        """True once the deadline has passed (outside pauses) or the watchdog fired."""
        with self._cond:
            return self._expired or (
                self._paused_since is None and not self._stopped and time.monotonic() >= self._ends
            )

    def error(self) -> DownloadError:
        """The error that reports this deadline as exceeded (retryable)."""
        return DownloadError(
            f"downloading {self._shown_url} took longer than {self.seconds:g} s", retryable=True
        )

    def check(self) -> None:
        """Raise :meth:`error` if the deadline has passed."""
        if self.expired:
            raise self.error()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Do not count the time spent in this block (S3 calls)."""
        since = time.monotonic()
        with self._cond:
            outermost = self._paused_since is None
            if outermost:
                self._paused_since = since
        try:
            yield
        finally:
            if outermost:
                with self._cond:
                    self._ends += time.monotonic() - since
                    self._paused_since = None
                    self._cond.notify_all()

    def stop(self) -> None:
        """The body has been read: the watchdog must no longer touch the connection."""
        with self._cond:
            self._stopped = True
            self._socket = None
            self._cond.notify_all()

    @contextlib.contextmanager
    def watching(self, response: httpx.Response) -> Iterator[None]:
        """Have the watchdog watch ``response``'s connection; stopped before it is closed."""
        stream = response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        with self._cond:
            self._socket = sock if isinstance(sock, socket.socket) else None
        _WATCHDOG.add(self)
        try:
            yield
        finally:
            self.stop()
            _WATCHDOG.discard(self)

    def _due_in(self, now: float) -> float | None:
        """Seconds until the watchdog must fire (≤ 0: now); None while paused or stopped.
        Called by the watchdog with the condition held."""
        if self._stopped or self._expired or self._paused_since is not None:
            return None
        return self._ends - now

    def _fire(self) -> None:
        """Time is up: mark it and cut the connection. Called with the condition held."""
        self._expired = True
        if self._socket is not None:
            # socket.socket's own shutdown, also for an SSLSocket: SSLSocket.shutdown would
            # tear down the TLS object under the thread still reading it.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(self._socket, socket.SHUT_RDWR)


def _decoded(response: httpx.Response, deadline: _Deadline, shown_url: str) -> Iterator[bytes]:
    """The response body, content codings undone in bounded steps, within ``deadline``."""
    if response.is_stream_consumed:
        # Read whole before it got here (a mock transport's answer); httpx decoded it then.
        return _within(iter([response.content]), deadline)
    listed = response.headers.get_list("content-encoding", split_commas=True)
    codings = [c for c in (v.strip().lower() for v in listed) if c and c != "identity"]
    unknown = [coding for coding in codings if coding not in _ZLIB_WBITS]
    if unknown:
        # As httpx does: storage servers put odd values here ("binary", "utf-8") on bodies
        # that are not encoded at all.
        log.warning("%s: ignoring unknown Content-Encoding %s", shown_url, ", ".join(unknown))
    body: Iterator[bytes] = _within(response.iter_raw(), deadline)
    # Codings are listed in the order they were applied: undo the last one first.
    for coding in reversed(codings):
        if coding in _ZLIB_WBITS:
            body = _inflate(body, coding, shown_url)
    return body


def _within(chunks: Iterator[bytes], deadline: _Deadline) -> Iterator[bytes]:
    """``chunks`` as read off the network, ended by ``deadline``'s error once it passes."""
    try:
        for chunk in chunks:
            deadline.check()
            yield chunk
    except httpx.HTTPError as exc:
        if deadline.expired:
            raise deadline.error() from exc
        raise
    # A body framed by the connection's end looks complete when the watchdog cut it.
    deadline.check()


def _inflate(chunks: Iterable[bytes], coding: str, shown_url: str) -> Iterator[bytes]:
    """Undo one gzip or deflate coding, yielding at most ``_DECODE_STEP`` bytes at a time."""
    wbits = _ZLIB_WBITS[coding]
    inflater = zlib.decompressobj(wbits)
    started = False
    for chunk in chunks:
        pending = chunk
        while pending and not inflater.eof:
            try:
                out = inflater.decompress(pending, _DECODE_STEP)
            except zlib.error as exc:
                if not started and wbits == zlib.MAX_WBITS:
                    # "deflate" sent as a raw stream without its zlib header, as some servers
                    # do (httpx accepts it too).
                    wbits = -zlib.MAX_WBITS
                    inflater = zlib.decompressobj(wbits)
                    continue
                raise DownloadError(
                    f"{shown_url} sent a corrupt {coding} body: {exc}", retryable=False
                ) from None
            started = True
            if out:
                yield out
            pending = inflater.unconsumed_tail
            # A full step can leave output inside zlib with no input left to feed it.
            while not pending and len(out) == _DECODE_STEP and not inflater.eof:
                out = inflater.decompress(b"", _DECODE_STEP)
                if out:
                    yield out
    if not inflater.eof:
        raise DownloadError(f"{shown_url} ended inside its {coding} body", retryable=True)


class _MultipartUpload:
    """One multipart upload in flight: sends parts, then completes or aborts."""

    def __init__(
        self, s3: S3Client, bucket: str, key: str, upload_id: str, *, checksums: bool
    ) -> None:
        self._s3 = s3
        self._bucket = bucket
        self._key = key
        self._upload_id = upload_id
        self._checksums = checksums
        self._parts: list[CompletedPartTypeDef] = []

    def send(self, body: memoryview) -> None:
        """Upload the next part (its bytes are copied by the socket, not by us)."""
        number = len(self._parts) + 1
        try:
            with _body(body) as reader:
                checksum = _checksum_args(
                    hashlib.sha256(body).digest() if self._checksums else None
                )
                answer = self._s3.upload_part(
                    Bucket=self._bucket,
                    Key=self._key,
                    UploadId=self._upload_id,
                    PartNumber=number,
                    Body=reader,
                    **checksum,
                )
                # CompleteMultipartUpload needs each part's checksum again, when parts had one.
                self._parts.append(
                    {"PartNumber": number, "ETag": answer.get("ETag", ""), **checksum}
                )
        except (BotoCoreError, ClientError) as exc:
            raise _storage_error("UploadPart", self._bucket, self._key, exc) from exc

    def complete(self) -> str:
        """Complete the upload; returns the object's ETag ("" if the endpoint sent none)."""
        try:
            done = self._s3.complete_multipart_upload(
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": self._parts},
            )
        except (BotoCoreError, ClientError) as exc:
            raise _storage_error("CompleteMultipartUpload", self._bucket, self._key, exc) from exc
        return done.get("ETag", "")

    def abort(self) -> None:
        """Abort the upload so no parts are left behind; never raises."""
        try:
            self._s3.abort_multipart_upload(
                Bucket=self._bucket, Key=self._key, UploadId=self._upload_id
            )
        except (BotoCoreError, ClientError) as exc:
            # Nothing more to do from here; a bucket lifecycle rule
            # (AbortIncompleteMultipartUpload) is the backstop.
            log.warning(
                "could not abort multipart upload %s of s3://%s/%s: %s",
                self._upload_id,
                self._bucket,
                self._key,
                _storage_error("AbortMultipartUpload", self._bucket, self._key, exc),
            )


class _BodyRaw(io.RawIOBase):
    """A seekable read-only file over a memoryview, so botocore can read, sign and re-send
    a part without us copying it into a bytes object first."""

    def __init__(self, data: memoryview) -> None:
        super().__init__()
        self._data = data
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        out = memoryview(buffer).cast("B")
        n = max(0, min(len(out), len(self._data) - self._pos))
        out[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self._pos = offset
        elif whence == io.SEEK_CUR:
            self._pos += offset
        elif whence == io.SEEK_END:
            self._pos = len(self._data) + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if self._pos < 0:
            raise ValueError("negative seek position")
        return self._pos

    def tell(self) -> int:
        return self._pos


@contextlib.contextmanager
def _body(data: memoryview) -> Iterator[io.BufferedReader[_BodyRaw]]:
    """A buffered file over ``data`` for botocore, closed afterwards."""
    reader = io.BufferedReader(_BodyRaw(data))
    try:
        yield reader
    finally:
        reader.close()


def _check_response(response: httpx.Response, shown_url: str, limit: int) -> None:
    """Raise the right DownloadError for a non-2xx answer or a declared size over the limit."""
    status = response.status_code
    if not response.is_success:
        if status in _NOT_FOUND_STATUSES:
            raise DownloadError(
                f"{shown_url} answered HTTP {status}", retryable=False, status_code=status
            )
        retryable = status in (408, 429) or status >= 500
        raise DownloadError(
            f"{shown_url} answered HTTP {status}", retryable=retryable, status_code=status
        )
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise OutputTooLargeError(
            f"{shown_url} is {int(declared)} bytes, over the {limit // (1024 * 1024)} MiB limit"
        )


def _download_error(exc: httpx.HTTPError | httpx.InvalidURL, shown_url: str) -> DownloadError:
    # UnsupportedProtocol is a TransportError but will never work; nor will a redirect loop.
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.TooManyRedirects | httpx.InvalidURL):
        return DownloadError(f"cannot fetch {shown_url}: {exc}", retryable=False)
    return DownloadError(
        f"fetching {shown_url} failed: {type(exc).__name__}: {exc}", retryable=True
    )


def _checksum_args(digest: bytes | None) -> _ChecksumArgs:
    """PutObject/UploadPart arguments (and a completed part's) that have S3 verify a body
    against its SHA-256 ``digest``; none for None, uploading without checksums."""
    return {} if digest is None else {"ChecksumSHA256": base64.b64encode(digest).decode()}


def _checksum_algorithm_args(with_checksum: bool) -> _ChecksumAlgorithmArgs:
    """CreateMultipartUpload's argument announcing the parts' SHA-256 checksums, if any."""
    return {"ChecksumAlgorithm": "SHA256"} if with_checksum else {}


def _storage_error(
    operation: str, bucket: str, key: str | None, exc: BotoCoreError | ClientError
) -> StorageError:
    where = f"s3://{bucket}/{key}" if key is not None else f"s3://{bucket}"
    if isinstance(exc, ClientError):
        # Code and status only: S3's error bodies can echo request details we do not want in
        # job records or logs.
        return StorageError(
            f"S3 {operation} on {where} failed: {_error_code(exc)} (HTTP {_http_status(exc)})"
        )
    return StorageError(f"S3 {operation} on {where} failed: {type(exc).__name__}: {exc}")


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "Unknown"))


def _http_status(exc: ClientError) -> int | None:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _clean_content_type(value: str | None) -> str | None:
    """Upstream's Content-Type if it is specific and safe to store, else None."""
    if not value:
        return None
    value = value.strip()
    if not _CONTENT_TYPE_OK.match(value):
        return None
    if value.split(";", 1)[0].strip().lower() in _GENERIC_MEDIA_TYPES:
        return None
    return value


def _key_ext(key: str, kind: OutputKind) -> str:
    ext = posixpath.splitext(key)[1].lstrip(".")
    return ext if ext in _MEDIA_TYPE_FOR_EXT else _DEFAULT_EXT[kind]


def _redact(url: str) -> str:
    """The URL without query or fragment: upstream URLs may carry signatures."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _header_safe(text: str) -> str:
    return quote(text, safe=_URL_SAFE)


def _metadata(
    *, job_id: str, request_id: str, source_url: str, kind: OutputKind, index: int
) -> dict[str, str]:
    """Object metadata, with ``source-url`` cut to keep the whole set under S3's 2 KB.

    Room is kept for ``sha256`` and ``bytes``, added once the body has been read.
    """
    meta = {
        "job-id": _header_safe(job_id)[:128],
        "request-id": _header_safe(request_id)[:256],
        "kind": kind.value,
        "index": str(index),
        "source-url-sha256": _digest(source_url),
    }
    reserved = len("sha256") + 64 + len("bytes") + 20
    used = sum(len(k) + len(v) for k, v in meta.items()) + reserved + len("source-url")
    meta["source-url"] = _header_safe(source_url)[: max(0, S3_METADATA_MAX_BYTES - used)]
    return meta
