"""The ingest function: MinIO notifications and CloudEvent / JobSubmit requests -> jobs.

Everything goes through a real nats-server, the real conductor and the real probe stage
(ffprobe on a generated clip): a notification is published on ``ingest.minio`` exactly as
MinIO's NATS target publishes it (JetStream, the ``event.Log`` JSON of
tests/fixtures/minio_put_event.json), and requests are real NATS requests.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.errors import NoRespondersError

from functions.conductor import function as conductor
from functions.ingest import function as ingest
from functions.ingest.handler import counter
from functions.ingest.minio import Ignore, MinioNotification, Start, decide
from functions.ingest.requests import parse as parse_request
from functions.probe import function as probe
from shared.dlq import list_entries
from shared.errors import PermanentError
from shared.events import InputRef, JobSubmit, StepSpec, encode
from shared.function import Services
from shared.ids import new_upload_id
from shared.runtime import Runtime
from shared.settings import Settings, load_settings
from tests.support.nats import consumer_settled, running, wait_for_job
from tests.support.waiting import eventually

FIXTURE = Path(__file__).parent / "fixtures" / "minio_put_event.json"
PROBE_ONLY = {"probe": {"stage": "probe", "uses": [":input"]}}
RULES = [{"prefix": "incoming/", "steps": PROBE_ONLY}]
DROPPED_KEY = "incoming/my video (1).mp4"  # what the fixture's encoded key decodes to


def notification(**object_fields: Any) -> dict[str, Any]:
    """The real MinIO payload, with some ``s3.object`` fields replaced."""
    event: dict[str, Any] = json.loads(FIXTURE.read_text())
    event = copy.deepcopy(event)
    event["Records"][0]["s3"]["object"].update(object_fields)
    return event


def services_of(rt: Runtime) -> Services:
    assert rt.services is not None
    return rt.services


async def publish_notification(services: Services, payload: dict[str, Any] | bytes) -> None:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    # MinIO's NATS target with JETSTREAM=on: a plain JetStream publish, no message id.
    await services.bus.js.publish(services.names.minio_notifications, data)


def ingest_count(services: Services, source: str, outcome: str) -> float:
    return counter(services.telemetry).labels(source, outcome)._value.get()


async def request(services: Services, body: bytes | dict[str, Any],
                  headers: dict[str, str] | None = None) -> dict[str, Any]:
    """A real NATS request. Ingest's responder subscribes just after the runtime starts: until
    then the server answers "no responders" (the request went nowhere), so ask again."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    replies: list[bytes] = []

    async def answered() -> bool:
        try:
            reply = await services.bus.nc.request(services.names.ingest_request, data,
                                                  headers=headers, timeout=15)
        except NoRespondersError:
            return False
        replies.append(reply.data)
        return True

    await eventually(answered, what="ingest answering on its request subject")
    answer: dict[str, Any] = json.loads(replies[0])
    return answer


async def upload(services: Services, clip: Path, tenant: str = "default") -> str:
    upload_id = new_upload_id()
    await services.store.put_file(f"uploads/{tenant}/{upload_id}/{clip.name}", clip)
    return upload_id


def ingest_settings(make_settings: Any, **overrides: Any) -> Settings:
    settings: Settings = make_settings(ingest_rules=overrides.pop("ingest_rules", RULES),
                                       **overrides)
    return settings


def stack() -> list[Any]:
    return [ingest, conductor, probe]


# --- pure decisions (no I/O) ----------------------------------------------------------------


def test_the_fixture_key_is_url_decoded_and_names_one_version() -> None:
    settings = load_settings({}, ingest_rules=RULES)
    record = msgspec.convert(json.loads(FIXTURE.read_text()), MinioNotification).records[0]
    first = decide(record, settings)
    assert isinstance(first, Start)
    assert first.key == DROPPED_KEY and first.filename == "my video (1).mp4"
    assert decide(record, settings) == first  # a repeat is the same job

    def rewritten(**fields: str) -> Any:
        return msgspec.structs.replace(
            record, s3=msgspec.structs.replace(record.s3, object=msgspec.structs.replace(
                record.s3.object, **fields)))

    # An overwrite with new bytes (a new ETag) is a new version: a new job.
    second = decide(rewritten(etag="0b5e0a4c2a9b8d7e6f5a4b3c2d1e0f9b",
                              sequencer="18669D4C3D6A2F41"), settings)
    assert isinstance(second, Start) and second.job_id != first.job_id
    # The id is what a store listing shows too (bucket, key, ETag), so the janitor's sweep
    # names the version the same way: the same bytes written again (only the sequencer
    # differs, which no listing has) are the job that exists.
    same_bytes = decide(rewritten(sequencer="18669D4C3D6A2F41"), settings)
    assert isinstance(same_bytes, Start) and same_bytes.job_id == first.job_id
    # A record with no ETag cannot name its version (the handler reads it from the store).
    with pytest.raises(PermanentError) as caught:
        decide(rewritten(etag=""), settings)
    assert caught.value.code == "invalid_event"


@pytest.mark.parametrize("key", ["incoming%2F..%2Fjobs%2Fx.mp4", "%2Fetc%2Fpasswd",
                                 "incoming%2Fa%00b.mp4", "incoming%2F%2Fx.mp4", "%FF%FE"])
def test_keys_that_could_escape_are_invalid_events(key: str) -> None:
    settings = load_settings({}, ingest_rules=RULES)
    record = msgspec.convert(notification(key=key), MinioNotification).records[0]
    with pytest.raises(PermanentError) as caught:
        decide(record, settings)
    assert caught.value.code == "invalid_event"


def test_removals_other_buckets_and_unmatched_prefixes_are_ignored() -> None:
    settings = load_settings({}, ingest_rules=[{"prefix": "incoming/videos/",
                                                "recipe": "thumbnails"}])
    base = notification(key="incoming%2Fvideos%2Fa.mp4")
    removed = copy.deepcopy(base)
    removed["Records"][0]["eventName"] = "s3:ObjectRemoved:Delete"
    other_bucket = copy.deepcopy(base)
    other_bucket["Records"][0]["s3"]["bucket"]["name"] = "elsewhere"
    cases = [removed, other_bucket, notification(key="incoming%2Fother%2Fa.mp4"),
             notification(key="uploads%2Fdefault%2Fa.mp4")]
    for payload in cases:
        record = msgspec.convert(payload, MinioNotification).records[0]
        assert isinstance(decide(record, settings), Ignore), payload
    record = msgspec.convert(base, MinioNotification).records[0]
    assert isinstance(decide(record, settings), Start)


# --- MinIO notifications through the bus ----------------------------------------------------


async def test_minio_notification_starts_one_job_that_succeeds(  # type: ignore[no-untyped-def]
        make_settings, clip_3s) -> None:
    settings = ingest_settings(make_settings)
    async with running(settings, stack()) as rt:
        services = services_of(rt)
        await services.store.put_file(DROPPED_KEY, clip_3s)
        payload = notification(size=clip_3s.stat().st_size)
        await publish_notification(services, payload)
        await publish_notification(services, payload)  # MinIO re-sends from its queue dir
        async def any_job() -> bool:
            return bool(await services.jobs.job_ids())

        await eventually(any_job, what="a job record")
        (job_id,) = await services.jobs.job_ids()
        record = await wait_for_job(services, job_id)
        assert record.status == "succeeded", record.error
        assert [i.key for i in record.inputs] == [DROPPED_KEY]
        assert record.inputs[0].filename == "my video (1).mp4"
        assert record.steps["probe"].meta, "probe ran on the decoded key's object"
        # Both deliveries were handled (acked, none left), and they made one job.
        assert await consumer_settled(services, services.names.ingest_stream,
                                      "ingest-minio") == (0, 0)
        assert ingest_count(services, "minio", "job") == 2
        assert await services.jobs.job_ids() == [job_id]
        # The same key written again with new bytes (a new ETag) is a new version: a new job.
        await publish_notification(services, notification(
            sequencer="18669D4C3D6A2F99", eTag="0b5e0a4c2a9b8d7e6f5a4b3c2d1e0f9b"))

        async def two_jobs() -> bool:
            return len(await services.jobs.job_ids()) == 2

        await eventually(two_jobs, what="a second job for the overwrite")


async def test_unmatched_and_removed_objects_are_acked_and_ignored(  # type: ignore[no-untyped-def]
        make_settings) -> None:
    settings = ingest_settings(make_settings, ingest_rules=[
        {"prefix": "incoming/videos/", "steps": PROBE_ONLY}])
    async with running(settings, [ingest]) as rt:
        services = services_of(rt)
        removed = notification(key="incoming%2Fvideos%2Fa.mp4")
        removed["Records"][0]["eventName"] = "s3:ObjectRemoved:Delete"
        await publish_notification(services, notification(key="incoming%2Fother%2Fa.mp4"))
        await publish_notification(services, removed)
        await eventually(lambda: ingest_count(services, "minio", "ignored") == 2,
                         what="both notifications ignored")
        assert await consumer_settled(services, services.names.ingest_stream,
                                      "ingest-minio") == (0, 0)
        assert await services.jobs.job_ids() == []
        assert (await list_entries(services, function="ingest")).entries == []


async def test_malformed_notifications_are_dead_lettered(  # type: ignore[no-untyped-def]
        make_settings) -> None:
    settings = ingest_settings(make_settings)
    async with running(settings, [ingest]) as rt:
        services = services_of(rt)
        await publish_notification(services, b"{not json")
        await publish_notification(services, {"EventName": "s3:ObjectCreated:Put",
                                              "Records": "nope"})
        await publish_notification(services, notification(key="incoming%2F..%2F..%2Fx.mp4"))
        await publish_notification(services, notification(key="incoming%2Fgone.mp4"))

        async def four_entries() -> bool:
            return len((await list_entries(services, function="ingest")).entries) == 4

        await eventually(four_entries, timeout=15, what="4 DLQ entries")
        entries = (await list_entries(services, function="ingest")).entries
        codes = [e.error.code for e in entries]
        assert codes == ["invalid_event", "invalid_event", "invalid_event", "input_not_found"]
        assert all(e.num_delivered == 1 for e in entries), "never retried"
        assert await consumer_settled(services, services.names.ingest_stream,
                                      "ingest-minio") == (0, 0)
        assert await services.jobs.job_ids() == []


# --- requests: CloudEvents and JobSubmit, with a reply ------------------------------------


async def test_structured_cloudevent_gets_its_job_id_and_runs(  # type: ignore[no-untyped-def]
        make_settings, clip_3s) -> None:
    settings = ingest_settings(make_settings)
    async with running(settings, stack()) as rt:
        services = services_of(rt)
        upload_id = await upload(services, clip_3s)
        event = {"specversion": "1.0", "type": "io.jetcut.job.request",
                 "source": "urn:example:cms", "id": "evt-1",
                 "datacontenttype": "application/json",
                 "data": {"steps": PROBE_ONLY, "input": upload_id}}
        headers = {"content-type": "application/cloudevents+json"}
        reply = await request(services, event, headers)
        job_id = reply["job_id"]
        # Answered after the commit: the record is there at once.
        assert (await services.jobs.get(job_id)).inputs[0].filename == clip_3s.name
        assert (await request(services, event, headers)) == {"job_id": job_id}  # same event
        record = await wait_for_job(services, job_id)
        assert record.status == "succeeded", record.error
        assert record.idempotency_key is not None and "evt-1" in record.idempotency_key
        # The same source+id with other data is a conflict, not a silent second job.
        changed = {**event, "data": {"recipe": "thumbnails", "input": upload_id}}
        assert (await request(services, changed, headers))["error"]["code"] == "conflict"


async def test_binary_cloudevent_and_plain_jobsubmit_run(  # type: ignore[no-untyped-def]
        make_settings, clip_3s) -> None:
    settings = ingest_settings(make_settings)
    async with running(settings, stack()) as rt:
        services = services_of(rt)
        upload_id = await upload(services, clip_3s, tenant="acme")
        headers = {"ce-specversion": "1.0", "ce-type": "io.jetcut.job.request",
                   "ce-source": "https%3A%2F%2Fcms.example%2Fhooks", "ce-id": "b-42",
                   "ce-tenant": "acme", "content-type": "application/json"}
        binary = await request(services, {"steps": PROBE_ONLY, "inputs": [upload_id]}, headers)
        key = f"uploads/acme/{upload_id}/{clip_3s.name}"
        body = encode(JobSubmit(tenant="acme", inputs=[InputRef(key=key)], steps={
            "probe": StepSpec(stage="probe", uses=[":input"])}, idempotency_key="order-7"))
        direct = await request(services, body)
        jobs = [binary["job_id"], direct["job_id"]]
        for job_id in jobs:
            record = await wait_for_job(services, job_id)
            assert record.status == "succeeded", record.error
            assert record.tenant == "acme"
        assert (await services.jobs.get(jobs[0])).idempotency_key == \
            'ce:["https://cms.example/hooks","b-42"]'
        assert (await request(services, body)) == {"job_id": jobs[1]}  # idempotent


BAD_REQUESTS: list[tuple[str, bytes, dict[str, str] | None, str]] = [
    ("not json", b"\x00garbage", None, "invalid_event"),
    ("structured without id", json.dumps({
        "specversion": "1.0", "type": "io.jetcut.job.request", "source": "s",
        "data": {"recipe": "thumbnails", "input": "incoming/x.mp4"}}).encode(),
     {"content-type": "application/cloudevents+json"}, "invalid_event"),
    ("binary without source", b'{"recipe": "thumbnails", "input": "incoming/x.mp4"}',
     {"ce-specversion": "1.0", "ce-type": "io.jetcut.job.request", "ce-id": "1"},
     "invalid_event"),
    ("unknown type", json.dumps({
        "specversion": "1.0", "type": "com.example.other", "source": "s", "id": "1",
        "data": {}}).encode(), None, "invalid_event"),
    ("data not an object", json.dumps({
        "specversion": "1.0", "type": "io.jetcut.job.request", "source": "s", "id": "1",
        "data": [1, 2]}).encode(), None, "invalid_event"),
    ("unknown field", json.dumps({
        "specversion": "1.0", "type": "io.jetcut.job.request", "source": "s", "id": "1",
        "data": {"recipe": "thumbnails", "input": "incoming/x.mp4", "x": 1}}).encode(),
     None, "invalid_event"),
    ("wrong specversion", json.dumps({
        "specversion": "0.3", "type": "io.jetcut.job.request", "source": "s", "id": "1",
        "data": {}}).encode(), None, "invalid_event"),
    ("unknown recipe", json.dumps({
        "specversion": "1.0", "type": "io.jetcut.job.request", "source": "s", "id": "2",
        "data": {"recipe": "nope", "input": "incoming/x.mp4"}}).encode(), None,
     "invalid_recipe"),
    ("missing input", json.dumps({
        "specversion": "1.0", "type": "io.jetcut.job.request", "source": "s", "id": "3",
        "data": {"recipe": "thumbnails", "input": "incoming/missing.mp4"}}).encode(), None,
     "input_not_found"),
    ("escaping key", json.dumps({"type": "job.submit", "recipe": "thumbnails",
                                 "inputs": [{"key": "incoming/../jobs/x/manifest.json"}]}
                                ).encode(), None, "invalid_request"),
    ("another tenant's upload", json.dumps({
        "type": "job.submit", "tenant": "acme", "recipe": "thumbnails",
        "inputs": [{"key": "uploads/default/u/x.mp4"}]}).encode(), None, "invalid_request"),
    ("no inputs", json.dumps({"type": "job.submit", "recipe": "thumbnails"}).encode(), None,
     "invalid_request"),
    ("batch mode", b"[]", {"content-type": "application/cloudevents-batch+json"},
     "invalid_event"),
    # Callbacks get the gateway's checks on every way in.
    ("loopback callback", json.dumps({
        "specversion": "1.0", "type": "io.jetcut.job.request", "source": "s", "id": "4",
        "data": {"recipe": "thumbnails", "input": "incoming/x.mp4",
                 "callback_url": "http://127.0.0.1:9/hook",
                 "callback_secret": "s" * 32}}).encode(), None, "invalid_callback"),
    ("file callback", json.dumps({
        "type": "job.submit", "recipe": "thumbnails", "inputs": [{"key": "incoming/x.mp4"}],
        "callback_url": "file:///etc/passwd", "callback_secret": "s" * 32}).encode(), None,
     "invalid_callback"),
]


async def test_bad_requests_get_error_replies_with_codes(  # type: ignore[no-untyped-def]
        make_settings) -> None:
    settings = ingest_settings(make_settings)
    async with running(settings, [ingest]) as rt:
        services = services_of(rt)
        for name, body, headers, code in BAD_REQUESTS:
            reply = await request(services, body, headers)
            assert set(reply) == {"error"}, (name, reply)
            assert reply["error"]["code"] == code, (name, reply)
            assert reply["error"]["message"], name
        assert await services.jobs.job_ids() == []
        assert ingest_count(services, "request", "error") == len(BAD_REQUESTS)


async def test_a_bad_rule_stops_ingest_at_start(make_settings) -> None:  # type: ignore[no-untyped-def]
    settings = ingest_settings(make_settings, ingest_rules=[{"prefix": "incoming/",
                                                             "recipe": "nope"}])
    async with running(settings, [ingest]) as rt:
        await eventually(lambda: bool(rt.crashed), what="ingest refusing its rules")
        assert rt.crashed == ["ingest:service"]


def test_structured_attributes_tenant_and_base64_data_are_read() -> None:
    import base64

    data = json.dumps({"recipe": "web", "input": "incoming/a.mp4"}).encode()
    event = {"specversion": "1.0", "type": "io.jetcut.job.request", "source": "s",
             "id": "7", "tenant": "acme", "data_base64": base64.b64encode(data).decode()}
    draft = parse_request({"content-type": "application/cloudevents+json"},
                          json.dumps(event).encode(), "default")
    assert (draft.mode, draft.tenant, draft.recipe, draft.refs) == \
        ("structured", "acme", "web", ["incoming/a.mp4"])
    assert draft.idempotency_key == 'ce:["s","7"]'


async def test_a_requests_callback_reaches_the_job(  # type: ignore[no-untyped-def]
        make_settings, clip_3s) -> None:
    settings = ingest_settings(make_settings, callback_allow_private=True)
    async with running(settings, [ingest]) as rt:
        services = services_of(rt)
        upload_id = await upload(services, clip_3s)
        event = {"specversion": "1.0", "type": "io.jetcut.job.request", "source": "s",
                 "id": "cb-1", "data": {"steps": PROBE_ONLY, "input": upload_id,
                                        "callback_url": "http://127.0.0.1:9/hook",
                                        "callback_secret": "s" * 32}}
        reply = await request(services, event, {"content-type": "application/cloudevents+json"})
        record = await services.jobs.get(reply["job_id"])
        assert (record.callback_url, record.callback_secret) == ("http://127.0.0.1:9/hook",
                                                                 "s" * 32)
