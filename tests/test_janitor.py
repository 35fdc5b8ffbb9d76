"""The janitor: intermediates after success, retention, stale uploads, orphaned temp dirs and
the re-drive of a job whose task message was lost. Real nats-server, real store, real ffmpeg.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from functions.janitor.cleanup import delete_intermediates, delete_job, intermediate_steps
from functions.janitor.sweep import sweep
from functions.janitor.tempdirs import owner_pid, remove_orphan_dirs
from functions.registry import FUNCTIONS
from shared.function import Services
from shared.jobstate import JobRecord, JobStatus, plan
from shared.jobstore import JobNotFound
from shared.media import Binaries, FFmpegRunner
from shared.recipes import resolve
from shared.runtime import Runtime
from shared.stage import step_prefix
from tests.support.media import MakeClip
from tests.support.nats import running, submit_job, until_http_up, wait_for_job
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(120)

HLS_STAGES = ("conductor", "probe", "segment", "rendition", "encode-part", "audio-extract",
              "concat", "package-hls", "janitor")
SEGMENTED = {  # probe and segment feed a noop: both are intermediates, "done" the output
    "probe": {"stage": "probe", "uses": [":input"]},
    "segment": {"stage": "segment", "uses": [":input", "probe"], "params": {"part_seconds": 1}},
    "done": {"stage": "noop", "uses": ["segment"]},
}


async def until(check: Callable[[], Awaitable[bool] | bool], timeout: float = 20.0) -> None:
    await eventually(check, timeout=timeout)


def services_of(rt: Runtime) -> Services:
    assert rt.services is not None
    return rt.services


def listed_keys(record: JobRecord) -> set[str]:
    """Every object key the record names, parts included."""
    keys = {k for s in record.steps.values() for k in s.outputs.values()}
    return keys | {k for s in record.steps.values() for p in s.parts for k in p.outputs.values()}


def janitor_count(rt: Runtime, action: str) -> float:
    text = rt.telemetry.metrics_text().decode()
    prefix = f'jetcut_janitor_actions_total{{action="{action}"}} '
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(lines[0].split()[-1]) if lines else 0.0


async def _empty(services: Services, prefix: str) -> bool:
    return await services.store.list(prefix) == []


async def _counted(rt: Runtime, action: str, at_least: float) -> bool:
    return janitor_count(rt, action) >= at_least


@pytest.fixture
def clip_2s(make_clip: MakeClip) -> Path:
    return make_clip("janitor_2s", duration=2.0, width=320, height=180)


def test_intermediates_are_the_steps_another_step_uses() -> None:
    hls = JobRecord(job_id="j", tenant="t")
    plan(hls, resolve("hls", None, {"ladder": [360, 240]}, 1))
    assert intermediate_steps(hls) == sorted(set(hls.steps) - {"package"})
    web = JobRecord(job_id="j", tenant="t")
    plan(web, resolve("web", None, {}, 1))
    assert intermediate_steps(web) == ["probe"]  # transcode and poster are the outputs


async def test_success_deletes_intermediates_and_keeps_outputs_downloadable(
    make_settings: Callable[..., Any], http_port: int, clip_2s: Path,
) -> None:
    settings = make_settings(http_port=http_port, concurrency=2)
    params = {"ladder": [180], "segment_seconds": 1, "part_seconds": 1, "preset": "ultrafast"}
    functions = [FUNCTIONS[name] for name in (*HLS_STAGES, "gateway")]
    async with running(settings, functions) as rt:
        services = services_of(rt)
        job_id = await submit_job(rt, [clip_2s], recipe="hls", params=params)
        done = await wait_for_job(services, job_id)
        assert done.status == "succeeded", done.error
        inner = intermediate_steps(done)
        assert set(inner) == set(done.steps) - {"package"}
        gone = {k for name in inner for k in done.steps[name].outputs.values()}
        gone |= {k for name in inner for p in done.steps[name].parts for k in p.outputs.values()}
        assert len(gone) >= 4  # two segments, two encoded parts, audio, the joined video

        record = await wait_for_job(services, job_id, until=lambda r: all(
            r.steps[name].cleaned_at is not None for name in inner))

        # The record stops listing them first; the objects go right after.
        for name in inner:
            assert record.steps[name].outputs == {}
            assert all(p.outputs == {} for p in record.steps[name].parts)
            await until(partial(_empty, services, step_prefix(job_id, name)))
        for key in gone:
            assert not await services.store.exists(key)
        assert record.steps["package"].cleaned_at is None
        assert record.steps["package"].outputs == done.steps["package"].outputs
        for key in listed_keys(record):  # no dead links
            assert await services.store.exists(key), key
        await until(lambda: _counted(rt, "delete_intermediates", len(gone)))

        async with httpx.AsyncClient(base_url=settings.base_url, timeout=30) as client:
            await until_http_up(client)
            listing = (await client.get(f"/v1/jobs/{job_id}/outputs")).json()["outputs"]
            assert {o["step"] for o in listing} == {"package"}
            for output in listing:
                r = await client.get(output["url"])
                assert r.status_code == 200, output
            master = next(o for o in listing if o["name"] == "master.m3u8")
            assert (await client.get(master["url"])).text.startswith("#EXTM3U")

        # A repeat (a redelivered cleanup) deletes nothing and leaves the record alone.
        _, revision = await services.jobs.get_with_revision(job_id)
        again = await delete_intermediates(services, job_id, time.time())
        assert again.objects == 0
        assert (await services.jobs.get_with_revision(job_id))[1] == revision


async def test_keep_intermediates_keeps_them(
    make_settings: Callable[..., Any], clip_2s: Path,
) -> None:
    settings = make_settings(keep_intermediates=True)
    functions = [FUNCTIONS[name] for name in ("conductor", "probe", "segment", "noop",
                                              "janitor")]
    async with running(settings, functions) as rt:
        services = services_of(rt)
        job_id = await submit_job(rt, [clip_2s], steps=SEGMENTED)
        done = await wait_for_job(services, job_id)
        assert done.status == "succeeded", done.error
        assert len(done.steps["segment"].outputs) == 2
        # The conductor asked for the cleanup; wait until the janitor has handled it.
        await until(lambda: _has_message(services, services.names.cleanup))
        await until(lambda: _consumer_idle(services, "janitor-cleanup"))

        record = await services.jobs.get(job_id)
        assert record.steps["segment"].cleaned_at is None
        assert record.steps["segment"].outputs == done.steps["segment"].outputs
        for key in listed_keys(record):
            assert await services.store.exists(key), key
        assert await services.store.exists(step_prefix(job_id, "segment") + "manifest.json")


async def _has_message(services: Services, subject: str) -> bool:
    info = await services.bus.js.stream_info(services.names.jobs_stream, subjects_filter=subject)
    return bool(info.state.subjects and info.state.subjects.get(subject))


async def _consumer_idle(services: Services, durable: str) -> bool:
    info = await services.bus.js.consumer_info(services.names.jobs_stream, durable)
    return (info.num_pending or 0, info.num_ack_pending or 0) == (0, 0) and bool(
        info.delivered and info.delivered.stream_seq)


async def test_retention_deletes_an_expired_job_and_keeps_a_fresh_one(
    make_settings: Callable[..., Any], tmp_path: Path,
) -> None:
    settings = make_settings(retention_s=3600)
    source = tmp_path / "input.bin"
    source.write_bytes(b"not media: noop never reads it")
    steps = {"only": {"stage": "noop", "uses": [":input"]}}
    functions = [FUNCTIONS[name] for name in ("conductor", "noop", "janitor")]
    async with running(settings, functions) as rt:
        services = services_of(rt)
        old_id = await submit_job(rt, [source], steps=steps)
        old = await wait_for_job(services, old_id)
        new_id = await submit_job(rt, [source], steps=steps)
        new = await wait_for_job(services, new_id)
        assert old.status == new.status == "succeeded"
        assert old.finished_at is not None and new.finished_at is not None
        assert new.finished_at > old.finished_at
        # noop stores nothing (it is declared without files): give each job an output of
        # its own, so the sweep has objects to delete under the expired job's prefix.
        for job_id in (old_id, new_id):
            await services.store.put_bytes(step_prefix(job_id, "only") + "out.bin", b"kept")
        assert await services.store.list(f"jobs/{old_id}/")

        # The old job finished more than retention_s before `now`, the new one exactly then.
        now = new.finished_at + settings.retention_s
        report = await sweep(services, now=now)
        assert report.expired == [old_id] and report.errors == []

        async def old_gone() -> bool:
            try:
                await services.jobs.get(old_id)
            except JobNotFound:
                return True
            return False

        await until(old_gone)
        assert old_id not in await services.jobs.job_ids()
        assert await services.store.list(f"jobs/{old_id}/") == []
        assert (await services.jobs.get(new_id)).status == "succeeded"
        assert await services.store.list(f"jobs/{new_id}/")
        await until(lambda: _counted(rt, "delete_job", 1))

        # Expired once: the next sweep has nothing to expire; a repeat cleanup is harmless.
        assert (await sweep(services, now=now)).expired == []
        repeat = await delete_job(services, old_id)
        assert (repeat.objects, repeat.record_deleted) == (0, False)


async def test_cleanup_never_touches_an_unfinished_job(make_settings: Callable[..., Any]) -> None:
    async with running(make_settings(), []) as rt:
        services = services_of(rt)
        record = JobRecord(job_id="jrunning", tenant="default", status=JobStatus.RUNNING)
        plan(record, resolve("web", None, {}, 1))
        await services.jobs.create(record)
        await services.store.put_bytes(step_prefix("jrunning", "probe") + "manifest.json", b"{}")

        whole = await delete_job(services, "jrunning")
        inner = await delete_intermediates(services, "jrunning", time.time())

        assert whole.skipped and not whole.record_deleted and inner.skipped
        assert await services.store.exists(step_prefix("jrunning", "probe") + "manifest.json")
        assert (await services.jobs.get("jrunning")).steps["probe"].cleaned_at is None


async def test_stale_unreferenced_uploads_are_deleted(
    make_settings: Callable[..., Any], tmp_path: Path,
) -> None:
    settings = make_settings(upload_retention_s=3600)
    source = tmp_path / "in.bin"
    source.write_bytes(b"input of a real job")
    functions = [FUNCTIONS[name] for name in ("conductor", "noop")]
    async with running(settings, functions) as rt:
        services = services_of(rt)
        job_id = await submit_job(rt, [source], steps={"only": {"stage": "noop",
                                                                  "uses": [":input"]}})
        assert (await wait_for_job(services, job_id)).status == "succeeded"
        referenced = (await services.jobs.get(job_id)).inputs[0].key
        stale = ["uploads/default/uaaaa/old.mp4", "uploads/other/ubbbb/old.mov"]
        fresh = "uploads/default/ucccc/new.mp4"
        for key in [*stale, fresh]:
            await services.store.put_bytes(key, b"x")
        # Two hours old, as a real upload from yesterday would be.
        day_old = time.time() - 2 * settings.upload_retention_s
        for key in [*stale, referenced]:
            os.utime(Path(settings.store_root, key), (day_old, day_old))

        report = await sweep(services)

        assert sorted(report.uploads_deleted) == sorted(stale) and report.errors == []
        for key in stale:
            assert not await services.store.exists(key)
        assert await services.store.exists(referenced)
        assert await services.store.exists(fresh)


def _dead_pid() -> int:
    """A pid that ran and was reaped: no process has it (until the kernel reuses it)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


async def test_orphaned_temp_dirs_of_dead_processes_are_removed(
    make_settings: Callable[..., Any], binaries: Binaries,
) -> None:
    settings = make_settings(orphan_after_s=60)
    work = Path(settings.work_dir)
    dead = _dead_pid()
    old = time.time() - 3600

    def make(name: str, age: float | None = old) -> Path:
        path = work / name
        path.mkdir()
        (path / "segment.ts").write_bytes(b"x" * 1000)
        if age is not None:
            os.utime(path, (age, age))
        return path

    orphan = make(f"jetcut-{dead}-abc123")
    young_orphan = make(f"jetcut-{dead}-young", age=None)
    ours = make(f"jetcut-{os.getpid()}-live")
    foreign = make("jetcut-empty-gconv")  # another jetcut dir, with no pid in its name
    runner = FFmpegRunner.from_settings(settings, binaries)

    async with runner.workdir() as step_dir:
        assert step_dir.parent == work and owner_pid(step_dir.name) == os.getpid()
        removed = await asyncio.to_thread(
            remove_orphan_dirs, work, now=time.time(), older_than=settings.orphan_after_s)
        far_future = await asyncio.to_thread(
            remove_orphan_dirs, work, now=time.time() + 10 * 3600, older_than=60)
        assert step_dir.is_dir()  # a running step's dir is never an orphan

    assert removed == [orphan]
    assert far_future == [young_orphan]  # also dead-owned; only its age had kept it
    assert not orphan.exists() and not young_orphan.exists()
    assert ours.is_dir() and foreign.is_dir()


async def test_stuck_job_whose_task_was_lost_is_redriven(
    make_settings: Callable[..., Any],
) -> None:
    settings = make_settings(stuck_after_s=0.5, sweep_interval_s=0.2)
    steps = {"only": {"stage": "noop"}}
    async with running(settings, [FUNCTIONS["conductor"]], name="planner") as planner:
        services = services_of(planner)
        job_id = await submit_job(planner, [], steps=steps)
        await wait_for_job(services, job_id, until=lambda r: "only" in r.steps)
        stream, subject = services.names.stages_stream, services.names.stage("noop")

        async def task_queued() -> bool:
            info = await services.bus.js.stream_info(stream, subjects_filter=subject)
            return bool(info.state.subjects and info.state.subjects.get(subject))

        await until(task_queued)
        # Waiting behind a queue is not being stuck: however old the record, a job whose
        # task may still arrive is left alone.
        later = (await services.jobs.get(job_id)).updated_at + 3600
        assert (await sweep(services, now=later)).redriven == []
        # The task message is lost (a purge, a replica lost with its data): nothing would
        # ever run the step, though the record says it is ready.
        await services.bus.js.purge_stream(stream, subject=subject)
        assert not await task_queued()

        async with running(settings, [FUNCTIONS["noop"], FUNCTIONS["janitor"]],
                           name="workers") as workers:
            record = await wait_for_job(services, job_id, timeout=30)
            assert record.status == "succeeded", record.error
            assert record.steps["only"].attempt >= 2  # a new attempt ran, not the lost one
            await until(lambda: _counted(workers, "redrive_stuck", 1))
