"""Operations at volume: uploads whose notifications were lost, and DLQ triage.

* **lost notifications**: N objects are written straight to the store under the ingest
  prefix (local store, real nats-server, the ``ingest`` function in-process); a MinIO
  notification is published for every other one, the rest are "lost". One janitor sweep
  then makes the missing jobs. Reported: objects without a job and objects with more than
  one (both must be 0), a second sweep's new jobs (0), and the sweep's wall time. The jobs
  are not run (no conductor): this measures finding and committing them.
* **DLQ triage**: M dead letters of K causes (each entry with its own job id, path and
  numbers in the message) are published on the DLQ stream; ``GET /v1/dlq/groups``'s work
  (``list_groups``) must find exactly K groups of the right sizes; its wall time is
  reported, and one group is replayed (``replay_group``: each entry re-published once and
  removed), in entries per second.

No peer: there is nothing comparable to run on this machine. ``quick`` shrinks N and M.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

from loadtests.common import BenchResult, Row, load_functions, nats_server, say, temp_dir
from shared import msgids
from shared.dlqgroups import list_groups, replay_group
from shared.events import DeadLetter, ErrorInfo, JobCancel, encode
from shared.ids import new_job_id
from shared.runtime import Runtime
from shared.settings import load_settings

NAME = "triage"
RULES = [{"prefix": "incoming/", "steps": {"n": {"stage": "noop", "uses": [":input"]}}}]
CAUSES = [
    "gave up after {n} attempts; last error: internal: no file at '/srv/jobs/{job}/in.mp4'",
    "timeout: ffmpeg ran {n}.{n}s on job {job}, past its deadline",
    "store_unavailable: PUT jobs/{job}/probe/manifest.json failed after {n} tries",
    "disk_full: wrote {n} bytes of {job} to /tmp/jetcut-{n}-x/part.mp4",
    "cannot decode StageTask: Expected `str`, got `int` - at `$.job_id` ({n})",
]


def notification(bucket: str, key: str, etag: str, size: int) -> bytes:
    record = {"eventName": "s3:ObjectCreated:Put", "s3": {
        "bucket": {"name": bucket},
        "object": {"key": quote_plus(key), "size": size, "eTag": etag, "sequencer": "1"}}}
    return json.dumps({"EventName": "s3:ObjectCreated:Put", "Key": f"{bucket}/{key}",
                       "Records": [record]}).encode()


async def lost_notifications(work: Path, server_url: str, objects: int) -> dict[str, Any]:
    from functions.janitor.sweep import sweep

    (work / "work").mkdir(parents=True, exist_ok=True)
    settings = load_settings(
        {}, nats_url=server_url, namespace="benchsweep", data_dir=str(work / "data"),
        store="local", store_dir=str(work / "store"), work_dir=str(work / "work"),
        http_port=0, fetch_timeout_s=0.5, ingest_rules=RULES, ingest_sweep_grace_s=0)
    runtime = Runtime(settings, load_functions(["ingest"]), service_name="bench-sweep")
    await runtime.start()
    try:
        services = runtime.services
        assert services is not None
        keys = [f"incoming/batch/clip-{i:05d}.mp4" for i in range(objects)]
        for i, key in enumerate(keys):
            info = await services.store.put_bytes(key, f"media {i}".encode())
            if i % 2 == 0:  # every other notification arrives; the rest are lost
                await services.bus.js.publish(services.names.minio_notifications,
                                              notification(settings.bucket, key, info.etag,
                                                           info.size))
        announced = (objects + 1) // 2
        deadline = time.monotonic() + 120
        while len(await services.jobs.job_ids()) < announced:
            if time.monotonic() > deadline:
                raise RuntimeError("the announced uploads did not all get their job")
            await asyncio.sleep(0.1)
        began = time.perf_counter()
        report = await sweep(services)
        sweep_s = time.perf_counter() - began
        again = await sweep(services)
        by_input: dict[str, int] = {}
        for job_id in await services.jobs.job_ids():
            for ref in (await services.jobs.get(job_id)).inputs:
                by_input[ref.key] = by_input.get(ref.key, 0) + 1
        return {
            "objects": objects, "announced": announced, "made_by_sweep": len(report.ingest_jobs),
            "sweep_s": sweep_s, "second_sweep_made": len(again.ingest_jobs),
            "without_job": sum(1 for k in keys if k not in by_input),
            "duplicated": sum(1 for n in by_input.values() if n > 1),
            "errors": report.errors + again.errors,
        }
    finally:
        await runtime.stop()


async def triage(work: Path, server_url: str, entries: int) -> dict[str, Any]:
    (work / "work").mkdir(parents=True, exist_ok=True)
    settings = load_settings(
        {}, nats_url=server_url, namespace="benchtriage", data_dir=str(work / "data"),
        store="local", store_dir=str(work / "store"), work_dir=str(work / "work"), http_port=0)
    runtime = Runtime(settings, [], service_name="bench-triage")
    await runtime.start()
    try:
        services = runtime.services
        assert services is not None
        names = services.names
        for i in range(entries):
            cause = i % len(CAUSES)
            job = new_job_id()
            cancel = JobCancel(job_id=job, reason="bench")  # replayed where no one listens
            letter = DeadLetter(
                function="transcode", subject="jobs.cancel", data=encode(cancel),
                error=ErrorInfo(code="retries_exhausted",
                                message=CAUSES[cause].format(n=i * 7 + 3, job=job)),
                stream_seq=i + 1)
            await services.bus.publish(names.dlq("transcode"), letter,
                                       msg_id=msgids.dlq_entry("BENCH", i + 1))
        began = time.perf_counter()
        listed = await list_groups(services)
        groups_s = time.perf_counter() - began
        expected = sorted((entries + len(CAUSES) - 1 - c) // len(CAUSES)
                          for c in range(len(CAUSES)))
        got = sorted(g.count for g in listed.groups)
        target = listed.groups[0]
        began = time.perf_counter()
        result = await replay_group(services, target.group)
        replay_s = time.perf_counter() - began
        left = (await services.bus.js.stream_info(names.dlq_stream)).state.messages
        return {
            "entries": entries, "causes": len(CAUSES), "groups": len(listed.groups),
            "group_sizes_right": got == expected, "groups_s": groups_s,
            "replayed": result.replayed, "group_size": target.count, "replay_s": replay_s,
            "left_in_dlq": left,
        }
    finally:
        await runtime.stop()


def main(quick: bool) -> dict[str, Any]:
    objects, entries = (40, 200) if quick else (400, 2000)
    with temp_dir("triage") as work, nats_server(work / "nats") as server:
        sweep = asyncio.run(lost_notifications(work / "sweep", server.url, objects))
        say(f"triage: sweep of {objects} objects: {sweep['sweep_s']:.2f}s, made "
            f"{sweep['made_by_sweep']}, without job {sweep['without_job']}, duplicated "
            f"{sweep['duplicated']}")
        groups = asyncio.run(triage(work / "triage", server.url, entries))
        say(f"triage: {entries} entries -> {groups['groups']} groups in "
            f"{groups['groups_s']:.2f}s; replay of {groups['replayed']} in "
            f"{groups['replay_s']:.2f}s")
    return {"sweep": sweep, "dlq": groups}


def run(*, quick: bool) -> BenchResult:
    """``main`` as report rows (what ``python -m loadtests`` expects)."""
    figures = main(quick)
    sweep, dlq = figures["sweep"], figures["dlq"]
    result = BenchResult(name=NAME, raw=figures)
    n = sweep["objects"]
    result.rows += [
        Row(benchmark=NAME, metric=f"{n} uploads, every other notification dropped: uploads "
            "without a job + duplicate jobs after one sweep", unit="objects",
            jetcut=sweep["without_job"] + sweep["duplicated"], target_op="<=", target=0,
            target_on="value"),
        Row(benchmark=NAME, metric=f"janitor sweep making {sweep['made_by_sweep']} missing "
            f"jobs ({n} objects listed)", unit="s", jetcut=sweep["sweep_s"]),
        Row(benchmark=NAME, metric=f"GET /v1/dlq/groups over {dlq['entries']} dead letters "
            f"of {dlq['causes']} causes", unit="s", jetcut=dlq["groups_s"]),
        Row(benchmark=NAME, metric=f"replay of one group ({dlq['group_size']} entries)",
            unit="entries/s", jetcut=dlq["replayed"] / dlq["replay_s"] if dlq["replay_s"]
            else None),
    ]
    result.notes += [
        f"Sweep: {sweep['announced']} jobs came from notifications, {sweep['made_by_sweep']} "
        f"from the sweep; a second sweep made {sweep['second_sweep_made']}; errors: "
        f"{sweep['errors'] or 'none'}.",
        f"DLQ: {dlq['groups']} groups found for {dlq['causes']} causes (sizes right: "
        f"{dlq['group_sizes_right']}); {dlq['replayed']} replayed, {dlq['left_in_dlq']} left "
        "in the DLQ.",
    ]
    if (sweep["second_sweep_made"] or sweep["errors"] or dlq["groups"] != dlq["causes"]
            or not dlq["group_sizes_right"]
            or dlq["left_in_dlq"] != dlq["entries"] - dlq["replayed"]):
        result.error = "a check failed: see the notes"
    return result
