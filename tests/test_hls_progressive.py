"""Recipe ``hls`` is playable while it runs: growing playlists, segments, playable_at.

Through the real gateway, bus, conductor and stages: the job view names a ``playback_url``
as soon as part 0 of the first (fast) rung is encoded; the playlists the gateway builds from
the record grow (``EVENT``) and end (``ENDLIST``); every segment is a part with sound, on
the whole video's timeline, audio within 40 ms of video; the segments played one after
the other are the whole video, every frame once; and after success the stream is the
packaged VOD.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from functions.registry import FUNCTIONS
from shared import playback
from shared.jobstate import JobRecord, JobStatus, PartState
from shared.media import Binaries
from tests.support.media import MakeClip
from tests.support.nats import running, until_http_up, upload, wait_for_job

pytestmark = pytest.mark.timeout(120)

OPEN = {"allow_anonymous": True, "rate_limit_key_per_s": 0, "rate_limit_address_per_s": 0}
FPS = 25
SECONDS = 10
PARAMS = {"ladder": [360, 240], "segment_seconds": 2, "part_seconds": 3,
          "first_part_seconds": 1}


def _ffprobe(binaries: Binaries, path: Path, *args: str) -> dict[str, Any]:
    # The static build's TS demuxer needs an empty GCONV_PATH (see tests/test_hls.py).
    env = {**os.environ, "GCONV_PATH": str(path.parent)}
    out = subprocess.run([binaries.ffprobe, "-v", "error", "-of", "json", *args, str(path)],
                         check=True, capture_output=True, timeout=60, env=env)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def _playlist(text: str) -> tuple[dict[str, str], list[tuple[float, str]]]:
    tags: dict[str, str] = {}
    segments: list[tuple[float, str]] = []
    duration = 0.0
    for line in (raw.strip() for raw in text.splitlines()):
        if line.startswith("#EXTINF:"):
            duration = float(line[8:].split(",")[0])
        elif line.startswith("#"):
            name, _, value = line.partition(":")
            tags[name] = value
        elif line:
            segments.append((duration, line))
    return tags, segments


def _starts(binaries: Binaries, path: Path) -> dict[str, float]:
    info = _ffprobe(binaries, path, "-show_streams")
    return {s["codec_type"]: float(s["start_time"]) for s in info["streams"]}


async def test_playable_while_running_then_vod(make_settings, http_port, make_clip: MakeClip,  # type: ignore[no-untyped-def]
                                               binaries: Binaries, tmp_path: Path) -> None:
    clip = make_clip("progressive", duration=SECONDS, width=640, height=360, fps=FPS)
    # Intermediates kept so the whole progressive stream can be read after success too.
    settings = make_settings(http_port=http_port, concurrency=1, keep_intermediates=True,
                             **OPEN)
    async with running(settings, list(FUNCTIONS.values())) as rt:
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=30) as client:
            await until_http_up(client)
            upload_id = await upload(client, clip.read_bytes(), "clip.mp4")
            r = await client.post("/v1/jobs", json={"recipe": "hls", "input": upload_id,
                                                    "params": PARAMS})
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            assert r.json()["playable_at"] is None and r.json()["playback_url"] is None

            # The first revision of the record that is playable: the job is still running
            # there (the other rung, the joins and the package are still to come).
            first = await wait_for_job(rt.services, job_id, timeout=90,
                                       until=lambda rec: rec.terminal
                                       or playback.playable_at(rec) is not None)
            assert first.status == JobStatus.RUNNING, first.error
            assert first.steps["package"].status in ("pending", "ready")
            at = playback.playable_at(first)
            assert at is not None and first.created_at < at
            assert first.steps["encode_240p"].parts[0].status == "done"

            # While the job runs: a growing stream, the fast rung first.
            view = (await client.get(f"/v1/jobs/{job_id}")).json()
            if view["status"] == "running":
                assert view["playable_at"] == at
                assert view["playback_url"].endswith(f"/v1/jobs/{job_id}/play/master.m3u8")
                master = await client.get(f"/v1/jobs/{job_id}/play/master.m3u8")
                assert master.status_code == 200, master.text
                assert master.headers["content-type"].startswith(
                    "application/vnd.apple.mpegurl")
                assert "240p.m3u8" in master.text
                media = await client.get(f"/v1/jobs/{job_id}/play/240p.m3u8")
                tags, listed = _playlist(media.text)
                assert listed and listed[0][1] == "240p/0.ts"
                if "#EXT-X-ENDLIST" not in tags:
                    assert tags["#EXT-X-PLAYLIST-TYPE"] == "EVENT"
                assert (await client.get(f"/v1/jobs/{job_id}/play/240p/99.ts")).status_code \
                    == 404

            record: JobRecord = await wait_for_job(rt.services, job_id, timeout=90)
            assert record.status == "succeeded", record.error
            rungs = playback.rungs(record)
            assert [r.name for r in rungs] == ["240p", "360p"]
            assert all(r.complete for r in rungs)
            segment_meta = record.steps["segment"].meta
            assert segment_meta["starts"][:3] == [0.0, 1.0, 3.0]  # the short first part
            source_frames = sum(segment_meta["frames"])
            assert source_frames == FPS * SECONDS

            # Both rungs, complete, every part in order, typed VOD now.
            for rung in rungs:
                text = (await client.get(f"/v1/jobs/{job_id}/play/{rung.name}.m3u8")).text
                tags, listed = _playlist(text)
                assert tags["#EXT-X-PLAYLIST-TYPE"] == "VOD" and "#EXT-X-ENDLIST" in tags
                assert [name for _, name in listed] == [
                    f"{rung.name}/{i}.ts" for i in range(len(segment_meta["durations"]))]
                assert [round(d, 3) for d, _ in listed] == [
                    round(d, 3) for d in segment_meta["durations"]]
                assert int(tags["#EXT-X-TARGETDURATION"]) >= max(d for d, _ in listed)

            # Each segment of the fast rung: video and sound, on the whole timeline,
            # audio within 40 ms of video; together the whole video, every frame once.
            joined = tmp_path / "joined.ts"
            origin = None
            with joined.open("wb") as out:
                for i, start in enumerate(segment_meta["starts"]):
                    seg = tmp_path / f"{i}.ts"
                    got = await client.get(f"/v1/jobs/{job_id}/play/240p/{i}.ts")
                    assert got.status_code == 200
                    assert got.headers["content-type"] == "video/mp2t"
                    seg.write_bytes(got.content)
                    out.write(got.content)
                    starts = _starts(binaries, seg)
                    assert set(starts) == {"video", "audio"}
                    origin = starts["video"] if origin is None else origin
                    assert abs(starts["video"] - origin - start) < 0.002, (i, starts)
                    assert abs(starts["audio"] - starts["video"]) <= 0.040, (i, starts)
            packets = _ffprobe(binaries, joined, "-select_streams", "v:0", "-count_packets",
                               "-show_entries", "stream=nb_read_packets")
            assert int(packets["streams"][0]["nb_read_packets"]) == source_frames

            # After success the stream is the packaged VOD.
            view = (await client.get(f"/v1/jobs/{job_id}")).json()
            assert view["playable_at"] == at
            assert view["playback_url"].endswith(
                f"/v1/jobs/{job_id}/outputs/package/master.m3u8")
            moved = await client.get(f"/v1/jobs/{job_id}/play/master.m3u8")
            assert moved.status_code == 307
            assert moved.headers["location"] == view["playback_url"]

            # The moment was announced on the job's events (SSE reads them back).
            async with client.stream("GET", f"/v1/jobs/{job_id}/events") as events:
                kinds = [line.partition(": ")[2] async for line in events.aiter_lines()
                         if line.startswith("event:")]
            assert kinds.count("playable") == 1
            assert kinds.index("playable") < len(kinds) - 1


async def test_a_job_that_is_not_progressive_has_no_stream(  # type: ignore[no-untyped-def]
        make_settings, http_port, make_clip: MakeClip) -> None:
    clip = make_clip("plain", duration=2, width=320, height=180, fps=FPS)
    settings = make_settings(http_port=http_port, **OPEN)
    async with running(settings, list(FUNCTIONS.values())) as rt:
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=30) as client:
            await until_http_up(client)
            upload_id = await upload(client, clip.read_bytes(), "clip.mp4")
            r = await client.post("/v1/jobs", json={"recipe": "hls", "input": upload_id,
                                                    "params": {"ladder": [180],
                                                               "progressive": False}})
            job_id = r.json()["job_id"]
            record = await wait_for_job(rt.services, job_id, timeout=60)
            assert record.status == "succeeded", record.error
            assert playback.playable_at(record) is None
            view = (await client.get(f"/v1/jobs/{job_id}")).json()
            assert view["playable_at"] is None
            # ... but a succeeded ladder still names its VOD.
            assert view["playback_url"].endswith("/outputs/package/master.m3u8")
            master = await client.get(f"/v1/jobs/{job_id}/play/master.m3u8")
            assert master.status_code == 307
            gone = await client.get(f"/v1/jobs/{job_id}/play/180p.m3u8")
            assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"


def _record(done: dict[str, list[bool]], status: JobStatus = JobStatus.RUNNING) -> JobRecord:
    """A planned progressive job whose split made three parts (1 s, 2 s, 2.5 s), with the
    given parts of each rung done."""
    from shared.events import InputRef
    from shared.jobstate import StepStatus, plan
    from shared.recipes import resolve

    record = JobRecord(job_id="jplay", tenant="acme", recipe="hls",
                       inputs=[InputRef(key="uploads/acme/u/clip.mp4", filename="clip.mp4")])
    plan(record, resolve("hls", None, {"ladder": [480, 240]}, 1))
    record.steps["segment"].meta = {"durations": [1.0, 2.0, 2.5]}
    for rung, flags in done.items():
        step = record.steps[f"encode_{rung}"]
        step.status = StepStatus.RUNNING
        step.parts = [PartState() for _ in flags]
        for i, flag in enumerate(flags):
            if flag:
                step.parts[i].status = StepStatus.DONE
                step.parts[i].finished_at = 100.0 + i
                step.parts[i].outputs = {"segment": f"jobs/jplay/encode_{rung}/p{i:04d}/s.ts"}
    record.status = status
    return record


def test_playlists_grow_from_the_start_without_gaps() -> None:
    # Part 1 of the fast rung is done but not part 0: nothing is playable yet.
    record = _record({"240p": [False, True, False], "480p": [True, True, True]})
    assert playback.playable_at(record) is None
    assert playback.master_playlist(record) is None
    assert playback.playback_url(record, "http://gw") is None

    record = _record({"240p": [True, False, True], "480p": [True, True, False]})
    assert playback.playable_at(record) == 100.0
    assert playback.playback_url(record, "http://gw") == "http://gw/v1/jobs/jplay/play/master.m3u8"
    # Only the fast rung: the other is not complete.
    master = playback.master_playlist(record)
    assert master is not None and "240p.m3u8" in master and "480p.m3u8" not in master
    fast = playback.listed(record)[0]
    tags, listed = _playlist(playback.media_playlist(record, fast))
    assert listed == [(1.0, "240p/0.ts")]  # part 2 waits for part 1
    assert tags["#EXT-X-PLAYLIST-TYPE"] == "EVENT" and "#EXT-X-ENDLIST" not in tags
    assert tags["#EXT-X-TARGETDURATION"] == "3"  # fixed from the start: the longest part

    record = _record({"240p": [True, True, True], "480p": [True, True, True]})
    master = playback.master_playlist(record)
    assert master is not None
    assert master.index("480p.m3u8") < master.index("240p.m3u8")  # highest first
    tags, listed = _playlist(playback.media_playlist(record, playback.listed(record)[0]))
    assert [d for d, _ in listed] == [1.0, 2.0, 2.5]
    assert tags["#EXT-X-PLAYLIST-TYPE"] == "EVENT" and "#EXT-X-ENDLIST" in tags

    record = _record({"240p": [True, True, True], "480p": [True, True, True]},
                     JobStatus.SUCCEEDED)
    tags, _ = _playlist(playback.media_playlist(record, playback.listed(record)[0]))
    assert tags["#EXT-X-PLAYLIST-TYPE"] == "VOD" and "#EXT-X-ENDLIST" in tags
    assert playback.playback_url(record, "http://gw") is None  # no package in this record
