"""Small, honest fakes of what the job steps talk to, for unit tests (no mocks).

Each fake is a plain class that answers from a script and records what it was asked, so
tests assert on real values:

* a :class:`Script` is a list of answers consumed in order, the last one repeating; an
  answer that is an exception is raised instead of returned; an empty script means "must
  not be called" and fails the test (AssertionError, which no step catches);
* :class:`FakeArchiver` raises its queued failures one per call, then succeeds;
* :class:`Recorder` is a ``Publisher`` that records every message and can be told to raise
  once (a worker dying between a hand-off's write and its publish);
* :class:`Clock` is the injected ``clock``: it moves only when told to.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from api_contracts.inputs import GenerationInput
from api_contracts.jobs import ArchivedOutput, OutputKind
from api_contracts.upstream import CancelResponse, ResultResponse, StatusResponse, SubmitResponse
from worker.errors import ServiceError
from worker.services.webhooks import DeliveryResult

A = TypeVar("A")

#: One recorded message: task name, positional args, kwargs, countdown.
Sent = tuple[str, list[Any], dict[str, Any], float]


class Script(Generic[A]):
    """Scripted answers of one method: consumed in order, the last one repeats."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.answers: list[A | BaseException] = []

    def set(self, *answers: A | BaseException) -> None:
        """Replace the script."""
        self.answers = list(answers)

    def next(self) -> A:
        """The next answer (raised if it is an exception)."""
        if not self.answers:
            raise AssertionError(f"unexpected call to {self.name}: nothing scripted")
        answer = self.answers[0] if len(self.answers) == 1 else self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


class FakeUpstream:
    """RunComfy: scripted answers per method; ``calls`` counts calls per method and
    ``requests`` lists ``(method, argument)`` in call order."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.requests: list[tuple[str, object]] = []
        self.on_submit: Script[SubmitResponse] = Script("upstream.submit")
        self.on_status: Script[StatusResponse] = Script("upstream.status")
        self.on_result: Script[ResultResponse] = Script("upstream.result")
        self.on_cancel: Script[CancelResponse] = Script("upstream.cancel")

    def _called(self, method: str, argument: object) -> None:
        self.calls[method] += 1
        self.requests.append((method, argument))

    def submit(self, inp: GenerationInput) -> SubmitResponse:
        self._called("submit", inp)
        return self.on_submit.next()

    def status(self, request_id: str) -> StatusResponse:
        self._called("status", request_id)
        return self.on_status.next()

    def result(self, request_id: str) -> ResultResponse:
        self._called("result", request_id)
        return self.on_result.next()

    def cancel(self, request_id: str) -> CancelResponse:
        self._called("cancel", request_id)
        return self.on_cancel.next()


BUCKET = "rc-outputs"


def archived_output(job_id: str, index: int, kind: OutputKind, source_url: str) -> ArchivedOutput:
    """What :class:`FakeArchiver` returns for one output (deterministic, valid sha256)."""
    key = f"runcomfy/{job_id}/{index}.{'png' if kind == OutputKind.IMAGE else 'mp4'}"
    return ArchivedOutput(
        kind=kind,
        index=index,
        source_url=source_url,
        s3_uri=f"s3://{BUCKET}/{key}",
        bucket=BUCKET,
        key=key,
        bytes=1000 + index,
        sha256=hashlib.sha256(source_url.encode()).hexdigest(),
        content_type="image/png" if kind == OutputKind.IMAGE else "video/mp4",
    )


class FakeArchiver:
    """S3: ``failures`` are raised one per call, in order; once none are left, every call
    succeeds with :func:`archived_output`. ``calls`` lists
    ``(job_id, request_id, index, kind, source_url)``; ``fresh`` the ``fresh`` flag of each."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int, OutputKind, str]] = []
        self.fresh: list[bool] = []
        self.failures: list[ServiceError] = []

    def fail(self, *errors: ServiceError) -> None:
        """Queue failures for the next calls."""
        self.failures.extend(errors)

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
        self.calls.append((job_id, request_id, index, kind, source_url))
        self.fresh.append(fresh)
        if self.failures:
            raise self.failures.pop(0)
        return archived_output(job_id, index, kind, source_url)


class FakeWebhooks:
    """Webhook deliveries: scripted ``DeliveryResult``s; ``sent`` lists
    ``(url, msg_id, body, timestamp)`` of every attempt."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, bytes, int]] = []
        self.on_deliver: Script[DeliveryResult] = Script("webhooks.deliver")

    def deliver(self, url: str, msg_id: str, body: bytes, *, timestamp: int) -> DeliveryResult:
        self.sent.append((url, msg_id, body, timestamp))
        return self.on_deliver.next()


@dataclass
class FakeServices:
    """The ``Services`` of a step context, all fakes."""

    upstream: FakeUpstream = field(default_factory=FakeUpstream)
    archiver: FakeArchiver = field(default_factory=FakeArchiver)
    webhooks: FakeWebhooks = field(default_factory=FakeWebhooks)


class Recorder:
    """A ``Publisher`` that records messages; ``fail_next`` makes the next publish raise
    (the worker died after the hand-off's write, before its publish)."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []
        self.fail_next = False

    def __call__(
        self, task: str, args: list[Any], kwargs: dict[str, Any], countdown: float
    ) -> None:
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("worker died before publishing")
        self.sent.append((task, list(args), dict(kwargs), countdown))


class Clock:
    """The injected clock (epoch seconds); it only moves when told to."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
