"""The whole pipeline with a real worker process: submit → polls → S3 → signed webhook."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from standardwebhooks.webhooks import Webhook

from api_contracts.jobs import JobStatus, WebhookState
from api_contracts.messages import QUEUE_POLL, TASK_ARCHIVE, TASK_NOTIFY, TASK_POLL, TASK_SUBMIT
from worker.devtools.emulator import EmulatorConfig, FaultRule
from worker.producer.producer import new_job_id, submit_message

from .conftest import BUCKET, TOKEN, WEBHOOK_SECRET, Stack, assert_clean_log, succeeded

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(stack_factory) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    s = stack_factory(EmulatorConfig(token=TOKEN, queue_s=0.1, run_s=0.3, capacity=16, seed=3))
    s.start_worker()
    yield s
    assert_clean_log(s)


SUBMITTED: list[str] = []


@pytest.fixture(autouse=True)
def reset_emulator(stack: Stack) -> Iterator[None]:
    stack.emulator.set_faults([])
    yield
    # let every webhook of this test land before the next test scripts the receiver
    for job_id in SUBMITTED:
        stack.wait(job_id, lambda r: r.webhook is None or r.webhook.state != "pending")
    SUBMITTED.clear()
    stack.emulator.set_faults([])
    stack.emulator.update_config(
        token=TOKEN, queue_s=0.1, run_s=0.3, images_per_set=2, video=False, fault_rates={}
    )
    stack.receiver.set_status(None)


def submit(stack: Stack, **fields: object) -> str:
    request = {
        "input": {"prompt": "a lighthouse at dusk", "size": "1024x1024", "force_single": True},
        "webhook_url": stack.receiver.url,
        "metadata": {"order": "42"},
    }
    request.update(fields)  # type: ignore[arg-type]
    job_id = stack.producer.enqueue(request).id
    SUBMITTED.append(job_id)
    return job_id


def s3_bytes(stack: Stack, key: str) -> bytes:
    client = boto3.client("s3", endpoint_url=stack.s3.endpoint_url)
    body: bytes = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    return body


def test_single_image_archived_and_webhook_verified(stack: Stack) -> None:
    job_id = submit(stack)
    record = stack.wait_webhook(job_id)
    assert record.status == JobStatus.SUCCEEDED, record.error
    assert record.request_id and record.submitted_at and record.finished_at
    assert [o.kind.value for o in record.outputs] == ["image"]
    out = record.outputs[0]
    assert out.key == f"e2e/{job_id}/0.png"
    assert out.s3_uri == f"s3://{BUCKET}/{out.key}" and out.content_type == "image/png"
    data = s3_bytes(stack, out.key)
    assert len(data) == out.bytes and hashlib.sha256(data).hexdigest() == out.sha256
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(data[16:20], "big") == 1024  # IHDR width
    assert record.status_calls >= 1
    assert record.webhook is not None and record.webhook.state == WebhookState.DELIVERED
    got = [d for d in stack.receiver.deliveries() if d.webhook_id == record.webhook.id]
    assert len(got) == 1 and got[0].verified
    # verify once more, independently, with the reference library
    headers = {"webhook-id": got[0].webhook_id, "webhook-timestamp": got[0].timestamp}
    headers["webhook-signature"] = got[0].headers["webhook-signature"]
    event = Webhook(WEBHOOK_SECRET).verify(got[0].body, headers)
    assert event["type"] == "job.succeeded"
    assert event["data"]["id"] == job_id
    assert event["data"]["request"]["metadata"] == {"order": "42"}
    assert event["data"]["outputs"][0]["sha256"] == out.sha256
    assert TOKEN not in got[0].body.decode()


def test_image_set_gives_ordered_outputs(stack: Stack) -> None:
    stack.emulator.update_config(images_per_set=3)
    job_id = submit(
        stack, input={"prompt": "three cats", "size": "2304x1728", "force_single": False}
    )
    record = stack.wait(job_id)
    assert record.status == JobStatus.SUCCEEDED, record.error
    assert [(o.kind.value, o.index) for o in record.outputs] == [
        ("image", 0),
        ("image", 1),
        ("image", 2),
    ]
    assert len({o.sha256 for o in record.outputs}) >= 1
    data = s3_bytes(stack, record.outputs[2].key)
    assert int.from_bytes(data[16:20], "big") == 2304
    assert int.from_bytes(data[20:24], "big") == 1728


def test_video_outputs(stack: Stack) -> None:
    stack.emulator.update_config(video=True)
    job_id = submit(stack, input={"prompt": "a clip", "force_single": False})
    record = stack.wait(job_id)
    assert record.status == JobStatus.SUCCEEDED, record.error
    kinds = [o.kind.value for o in record.outputs]
    assert "video" in kinds and kinds == sorted(kinds)  # images first, then videos
    video = next(o for o in record.outputs if o.kind.value == "video")
    assert video.content_type == "video/mp4" and video.key.endswith(".mp4")
    assert [o.index for o in record.outputs] == list(range(len(record.outputs)))


def test_upstream_cancelled(stack: Stack) -> None:
    stack.emulator.set_faults([FaultRule(kind="cancel", endpoint="submit")])
    job_id = submit(stack)
    record = stack.wait_webhook(job_id)
    assert record.status == JobStatus.CANCELLED
    assert record.error is not None and record.error.code == "upstream_cancelled"
    events = [
        d.event for d in stack.receiver.deliveries() if d.event and d.event["data"]["id"] == job_id
    ]
    assert [e["type"] for e in events] == ["job.cancelled"]


def test_generation_failed(stack: Stack) -> None:
    stack.emulator.set_faults([FaultRule(kind="fail", endpoint="submit")])
    record = stack.wait_webhook(submit(stack))
    assert record.status == JobStatus.FAILED
    assert record.error is not None and record.error.code == "generation_failed"


def test_a_refused_token_pauses_submissions_instead_of_failing_jobs(stack: Stack) -> None:
    from click.testing import CliRunner

    from worker.cli import main

    stack.emulator.update_config(token="a-different-token")  # our token is refused: 401
    try:
        job_id = submit(stack)
        record = stack.wait(job_id, lambda r: r.wait is not None and r.wait.reason == "paused")
        assert record.status != JobStatus.FAILED  # the account, not the job
        assert TOKEN not in record.model_dump_json()
        pause = stack.redis.get("rcw:pause")
        assert pause is not None and b"401" in pause and TOKEN.encode() not in pause
    finally:
        stack.emulator.update_config(token=TOKEN)
    resumed = CliRunner().invoke(main, ["resume"], env=stack.env)
    assert resumed.exit_code == 0, resumed.output
    record = stack.wait_webhook(job_id)
    assert record.status == JobStatus.SUCCEEDED, record.error


def test_429_storm_is_ridden_out(stack: Stack) -> None:
    before = stack.emulator.counters()
    stack.emulator.set_faults([FaultRule(kind="429", endpoint="any", times=8, retry_after_s=0.2)])
    record = stack.wait(submit(stack), timeout=45)
    assert record.status == JobStatus.SUCCEEDED, record.error
    after = stack.emulator.counters()
    assert after["faults"].get("429", 0) - before["faults"].get("429", 0) == 8


def test_output_urls_that_404_fail_the_job(stack: Stack) -> None:
    stack.emulator.set_faults([FaultRule(kind="output_404", endpoint="submit")])
    record = stack.wait(submit(stack), timeout=45)
    assert record.status == JobStatus.FAILED
    assert record.error is not None and record.error.code == "output_unavailable"


def test_webhook_receiver_down_then_up(stack: Stack) -> None:
    stack.receiver.fail_next(2, 503)
    record = stack.wait_webhook(submit(stack))
    assert record.webhook is not None
    assert record.webhook.state == WebhookState.DELIVERED
    assert [d.status_code for d in record.webhook.deliveries] == [503, 503, 204]
    got = [d for d in stack.receiver.deliveries() if d.webhook_id == record.webhook.id]
    assert len(got) == 3 and all(d.verified for d in got)
    assert len({d.body for d in got}) == 1  # the same event, byte for byte


def test_same_submit_message_twice_submits_once(stack: Stack) -> None:
    stack.emulator.update_config(run_s=1.0)
    job_id = new_job_id()
    request = {"input": {"prompt": "once", "force_single": True}}
    from api_contracts.jobs import JobRequest

    args, kwargs = submit_message(job_id, JobRequest.model_validate(request))
    before = stack.emulator.counters()["submits"]
    for _ in range(2):
        stack.app.send_task(TASK_SUBMIT, args=args, kwargs=kwargs, queue="runcomfy.submit")
    record = stack.wait(job_id)
    assert record.status == JobStatus.SUCCEEDED, record.error
    assert stack.emulator.counters()["submits"] - before == 1


def test_duplicated_poll_messages_keep_one_chain(stack: Stack) -> None:
    stack.emulator.update_config(run_s=2.0)
    job_id = submit(stack)
    record = stack.wait(job_id, lambda r: r.request_id is not None)
    seq = int(stack.redis.hget(f"rcw:job:{job_id}", "seq") or 0)
    for _ in range(4):
        stack.app.send_task(TASK_POLL, args=[job_id, seq], queue=QUEUE_POLL)
    record = stack.wait(job_id)
    assert record.status == JobStatus.SUCCEEDED, record.error
    calls = stack.emulator.counters()["status_calls_by_request"][record.request_id]
    # every duplicate may cost one status call before it loses the compare-and-set; a forked
    # chain would cost a whole second schedule of calls
    assert calls - record.status_calls <= 4, (calls, record.status_calls)


def test_malformed_messages_on_every_queue_do_not_stop_the_worker(stack: Stack) -> None:
    victim = submit(stack)
    stack.wait(victim)
    live = new_job_id()
    stack.producer.rt.store.create_if_absent(live, None)
    bad: list[tuple[str, list[Any], dict[str, Any]]] = [
        (TASK_SUBMIT, [live, {"input": {"prompt": ""}}], {}),
        (TASK_SUBMIT, ["not a valid id!"], {}),
        (TASK_POLL, ["x"], {"seq": "many"}),
        (TASK_ARCHIVE, [], {}),
        (TASK_NOTIFY, [victim, 1, 2, 3], {"extra": True}),
        (TASK_POLL, [{"job": 1}, None], {}),
    ]
    for task, args, kwargs in bad:
        queue = {"runcomfy.submit": "runcomfy.submit"}.get(task, task)
        stack.app.send_task(task, args=args, kwargs=kwargs, queue=queue)
    # raw garbage on each queue list, as a broken producer might push
    for queue in ("runcomfy.submit", "runcomfy.poll", "runcomfy.archive", "runcomfy.notify"):
        stack.redis.lpush(queue, json.dumps({"body": "!!!", "headers": {}, "properties": {}}))
        stack.redis.lpush(queue, b"\x00not json")
    record = stack.wait(submit(stack))
    assert record.status == JobStatus.SUCCEEDED
    failed = stack.wait(live)
    assert failed.status == JobStatus.FAILED
    assert failed.error is not None and failed.error.code in (
        "invalid_request",
        "malformed_message",
    )
    assert "prompt" in failed.error.message
    assert all(w.alive() for w in stack.workers)


def test_invalid_request_in_raw_message_fails_job_with_fields(stack: Stack) -> None:
    job_id = new_job_id()
    stack.app.send_task(
        TASK_SUBMIT,
        args=[job_id, {"input": {"prompt": "x", "width×height": "9x9", "scale": 7}}],
        queue="runcomfy.submit",
    )
    record = stack.wait(job_id)
    assert record.status == JobStatus.FAILED
    assert record.error is not None and record.error.code == "invalid_request"
    assert "width×height" in record.error.message and "scale" in record.error.message
    assert succeeded(stack.wait(submit(stack)))


def test_batch_submitted_jobs_all_complete(stack: Stack) -> None:
    from worker.producer.client import Client

    with Client(settings=stack.app.settings) as client:
        records = client.submit_many(
            [
                {
                    "input": {"prompt": f"batch {i}", "size": "1024x1024", "force_single": True},
                    "webhook_url": stack.receiver.url,
                }
                for i in range(4)
            ]
        )
    SUBMITTED.extend(r.id for r in records)
    for r in records:
        done = stack.wait_webhook(r.id)
        assert done.status == JobStatus.SUCCEEDED, done.error
        assert done.webhook is not None and done.webhook.state == WebhookState.DELIVERED
