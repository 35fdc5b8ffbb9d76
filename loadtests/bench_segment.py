"""Segment-parallel encoding: split -> N encode-part workers -> concat, against one ffmpeg.

* **jetcut**: a real nats-server, the conductor and the ``probe``, ``segment``,
  ``rendition``, ``audio-extract`` and ``concat`` stages in one in-process Runtime, and N
  ``encode-part`` workers as separate OS processes (``jetcut run encode-part``, N = the
  machine's cores, ``JETCUT_FFMPEG_THREADS`` = cores / N each), all on the local store.
  One job with inline steps: probe, segment into parts, audio encoded once, every part
  encoded by whichever worker is free, concat (stream copy, verified). The clock runs from
  the submit (the clip is already in the store) until the job record says ``succeeded``;
  the upload is timed apart.
* **one ffmpeg**: the same encode in one command using every core (x264 threads auto): the
  same video arguments as encode-part (``encode_args``: size, CRF, preset, VBV cap, keyframe
  grid), plus the same AAC audio, into one MP4.

Both outputs are checked: the joined file has every source frame; its video bitstream size
is reported against the single encode's. The clip is 30 s of 1280x720@25 ``testsrc2`` +
sine (10 s with ``quick``), cached in the user's cache dir; it is encoded to a 720p rung.

``main(quick)`` returns the figures as a dict; ``run(quick=...)`` wraps them as a report row.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from functions.encode_part.handler import encode_args
from loadtests.bench_render import make_clip
from loadtests.common import BenchResult, Row, nats_server, say, temp_dir
from shared.events import InputRef, JobSubmit, StepSpec
from shared.ids import new_job_id
from shared.media import Binaries, find_binaries
from shared.media.probe import probe
from shared.params.hls import EncodePartParams, default_maxrate_k, rung_size
from shared.runtime import Runtime
from shared.settings import Settings, load_settings

NAME = "segment"
JETCUT = str(Path(sys.executable).parent / "jetcut")
IN_PROCESS = ("conductor", "probe", "segment", "rendition", "audio-extract", "concat")
HEIGHT = 720
JOB_LIMIT_S = 900.0


def _params(segment_s: float) -> EncodePartParams:
    return EncodePartParams(height=HEIGHT, crf=23, preset="veryfast",
                            keyframe_seconds=segment_s, maxrate_k=default_maxrate_k(HEIGHT))


def steps(segment_s: float, part_s: float) -> dict[str, StepSpec]:
    p = _params(segment_s)
    return {
        "probe": StepSpec(stage="probe", uses=[":input"]),
        "segment": StepSpec(stage="segment", uses=[":input", "probe"],
                            params={"part_seconds": part_s}),
        "audio": StepSpec(stage="audio-extract", uses=[":input", "probe"]),
        "rung": StepSpec(stage="rendition", uses=["probe"], params={"height": HEIGHT}),
        "encode": StepSpec(stage="encode-part", each="segment",
                           uses=["segment", "probe", "rung"],
                           params={"height": p.height, "crf": p.crf, "preset": p.preset,
                                   "keyframe_seconds": p.keyframe_seconds,
                                   "maxrate_k": p.maxrate_k}),
        "concat": StepSpec(stage="concat", uses=["encode", "audio"], params={"name": "720p"}),
    }


def _ffprobe(binaries: Binaries, path: Path, *args: str) -> dict[str, Any]:
    out = subprocess.run([binaries.ffprobe, "-v", "error", "-of", "json", *args, str(path)],
                         check=True, capture_output=True, timeout=300)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def video_facts(binaries: Binaries, path: Path) -> tuple[int, int]:
    """(frames, video bitstream bytes) of the first video stream."""
    info = _ffprobe(binaries, path, "-select_streams", "v:0", "-show_entries", "packet=size")
    sizes = [int(p["size"]) for p in info["packets"]]
    return len(sizes), sum(sizes)


# --------------------------------------------------------------------------------------------
# one ffmpeg


def single_command(binaries: Binaries, clip: Path, out: Path, duration: float,
                   segment_s: float) -> list[str]:
    video = asyncio.run(probe(binaries, str(clip))).video
    assert video is not None, f"{clip} has no video stream"
    args = encode_args(clip, out, _params(segment_s), video, rung_size(1280, 720, HEIGHT),
                       0.0, duration)
    cut = args.index("-an")
    args[cut:cut + 1] = ["-map", "0:a:0", "-c:a", "aac", "-b:a", "128k", "-ac", "2",
                         "-ar", "48000"]
    return [binaries.ffmpeg, "-hide_banner", "-nostdin", "-v", "error", "-y", *args]


def run_single(binaries: Binaries, clip: Path, work: Path, duration: float,
               segment_s: float) -> dict[str, Any]:
    out = work / "single.mp4"
    argv = single_command(binaries, clip, out, duration, segment_s)
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, timeout=JOB_LIMIT_S)
    wall = time.perf_counter() - started
    frames, video_bytes = video_facts(binaries, out)
    return {"wall_s": wall, "frames": frames, "video_bytes": video_bytes,
            "argv": argv[1:]}


# --------------------------------------------------------------------------------------------
# jetcut


def _worker_env(settings: Settings, threads: int, work: Path) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("JETCUT_")},
        "JETCUT_NATS_URL": settings.nats_url, "JETCUT_NAMESPACE": settings.namespace,
        "JETCUT_STORE": "local", "JETCUT_STORE_DIR": settings.store_root,
        "JETCUT_WORK_DIR": str(work), "JETCUT_DATA_DIR": str(work / "data"),
        "JETCUT_FETCH_TIMEOUT_S": "0.5", "JETCUT_FFMPEG_THREADS": str(threads),
        "JETCUT_LOG_LEVEL": "INFO",
    }


async def _start_workers(count: int, env: dict[str, str],
                         logs: Path) -> list[asyncio.subprocess.Process]:
    procs = []
    for i in range(count):
        log = logs / f"encode-part-{i}.log"
        with log.open("wb") as fh:
            procs.append(await asyncio.create_subprocess_exec(
                JETCUT, "run", "encode-part", env=env, stdout=fh,
                stderr=asyncio.subprocess.STDOUT))
    deadline = time.monotonic() + 60
    for i, proc in enumerate(procs):  # ready = its consumer is bound (it logs so)
        log = logs / f"encode-part-{i}.log"
        while b"encode-part ready" not in log.read_bytes():
            if proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"encode-part worker {i} did not start:\n"
                                   + log.read_text()[-2000:])
            await asyncio.sleep(0.1)
    return procs


async def _stop_workers(procs: list[asyncio.subprocess.Process]) -> None:
    for proc in procs:
        if proc.returncode is None:
            proc.terminate()
    for proc in procs:
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def run_jetcut(server_url: str, work: Path, binaries: Binaries, clip: Path, warm: Path,
                     rounds: int, workers: int, threads: int, segment_s: float,
                     part_s: float) -> list[dict[str, Any]]:
    from functions.registry import FUNCTIONS

    (work / "work").mkdir(parents=True, exist_ok=True)
    settings = load_settings(
        {}, nats_url=server_url, namespace="benchsegment", data_dir=str(work / "data"),
        store="local", store_dir=str(work / "store"), work_dir=str(work / "work"),
        http_port=0, fetch_timeout_s=0.5, concurrency=2,
    )
    runtime = Runtime(settings, [FUNCTIONS[n] for n in IN_PROCESS], service_name="bench-seg")
    await runtime.start()
    procs: list[asyncio.subprocess.Process] = []
    try:
        procs = await _start_workers(workers, _worker_env(settings, threads, work / "work"),
                                     work)
        # A short job first, so that every worker has started ffmpeg once before the clock.
        await _job(runtime, binaries, warm, work, segment_s, part_s)
        return [await _job(runtime, binaries, clip, work, segment_s, part_s)
                for _ in range(rounds)]
    finally:
        await _stop_workers(procs)
        await runtime.stop()


async def _job(runtime: Runtime, binaries: Binaries, clip: Path, work: Path, segment_s: float,
               part_s: float) -> dict[str, Any]:
    services = runtime.services
    assert services is not None
    job_id = new_job_id()
    started = time.perf_counter()
    key = f"uploads/default/{job_id}/{clip.name}"
    info = await services.store.put_file(key, clip)
    uploaded = time.perf_counter()
    event = JobSubmit(job_id=job_id, inputs=[InputRef(key=key, filename=clip.name,
                                                      size=info.size)],
                      steps=steps(segment_s, part_s))
    await services.bus.publish(services.names.submit, event, msg_id=job_id)

    async def settled() -> Any:
        async for record in services.jobs.watch(job_id):
            if record.terminal:
                return record
        raise RuntimeError("watch ended")

    record = await asyncio.wait_for(settled(), JOB_LIMIT_S)
    finished = time.perf_counter()
    if record.status != "succeeded":
        raise RuntimeError(f"job {job_id} {record.status}: {record.error}")
    out = work / f"{job_id}.mp4"
    await services.store.get_file(record.steps["concat"].outputs["video"], out)
    frames, video_bytes = video_facts(binaries, out)
    s = record.steps

    def span(name: str) -> float | None:
        st = s[name]
        return st.finished_at - st.started_at if st.started_at and st.finished_at else None

    parts = s["encode"].parts
    part_runs = [p.finished_at - p.started_at for p in parts if p.started_at and p.finished_at]
    return {
        "job_id": job_id, "wall_s": finished - uploaded, "upload_s": uploaded - started,
        "frames": frames, "video_bytes": video_bytes, "parts": len(parts),
        "steps_s": {name: span(name) for name in s},
        "encode_parts_sum_s": sum(part_runs),
        "encode_part_max_s": max(part_runs, default=None),
        "first_encode_start_after_submit_s":
            min(p.started_at for p in parts if p.started_at) - record.created_at,
    }


# --------------------------------------------------------------------------------------------


def main(quick: bool) -> dict[str, Any]:
    """Run both sides (alternating, each after a warm-up) and return every figure."""
    duration = 10 if quick else 30
    rounds = 1 if quick else 3
    segment_s = 2.0 if quick else 4.0
    cores = os.cpu_count() or 1
    workers = cores
    threads = max(1, cores // workers)
    binaries = find_binaries(load_settings({}))
    clip = make_clip(binaries, duration=duration)
    warm = make_clip(binaries, duration=2)
    say(f"segment: {duration}s 1280x720 clip -> {HEIGHT}p; {workers} encode-part worker(s) "
        f"x {threads} thread(s) vs one ffmpeg on {cores} core(s); {rounds} round(s)")
    singles: list[dict[str, Any]] = []
    jets: list[dict[str, Any]] = []
    with temp_dir("segment") as work, nats_server(work / "nats") as server:
        run_single(binaries, clip, work, duration, segment_s)  # warm the page cache
        for round_ in range(rounds):
            singles.append(run_single(binaries, clip, work, duration, segment_s))
            jets += asyncio.run(run_jetcut(server.url, work / f"jetcut{round_}", binaries,
                                           clip, warm, 1, workers, threads, segment_s, segment_s))
            say(f"segment: round {round_ + 1}: jetcut {jets[-1]['wall_s']:.2f}s, one ffmpeg "
                f"{singles[-1]['wall_s']:.2f}s")
    jet = statistics.median(r["wall_s"] for r in jets)
    single = statistics.median(r["wall_s"] for r in singles)
    return {
        "clip": {"path": str(clip), "duration_s": duration, "size": "1280x720", "fps": 25,
                 "bytes": clip.stat().st_size},
        "rendition": f"{HEIGHT}p", "segment_seconds": segment_s, "part_seconds": segment_s,
        "cores": cores, "workers": workers, "threads_per_worker": threads, "rounds": rounds,
        "jetcut_wall_s": jet, "single_ffmpeg_wall_s": single, "ratio": jet / single,
        "size_ratio": statistics.median(j["video_bytes"] / s["video_bytes"]
                                        for j, s in zip(jets, singles, strict=True)),
        "frames_exact": all(j["frames"] == s["frames"] for j, s in zip(jets, singles,
                                                                     strict=True)),
        "single_argv": singles[0]["argv"], "single": singles, "jetcut": jets,
    }


def run(*, quick: bool) -> BenchResult:
    """``main`` as a report row (what ``python -m loadtests`` expects)."""
    figures = main(quick)
    result = BenchResult(name=NAME, raw=figures)
    result.rows.append(Row(
        benchmark=NAME,
        metric=f"{figures['clip']['duration_s']}s 720p clip: split -> {figures['workers']} "
               f"encode-part workers -> concat, wall (median of {figures['rounds']})",
        unit="s", jetcut=figures["jetcut_wall_s"], peer_name="one ffmpeg, all cores",
        peer=figures["single_ffmpeg_wall_s"], target_op="<=", target=1.25,
    ))
    last = figures["jetcut"][-1]
    steps_s = ", ".join(f"{k} {v:.2f}s" for k, v in last["steps_s"].items() if v is not None)
    result.notes += [
        f"{figures['workers']} encode-part worker process(es) x {figures['threads_per_worker']}"
        f" x264 thread(s) on {figures['cores']} core(s); the single ffmpeg lets x264 pick its "
        "threads. On one machine this measures the overhead of splitting, checkpointing and "
        "joining; the gain comes from adding machines (workers on other hosts take parts).",
        f"Last jetcut job: {last['parts']} parts; step spans {steps_s}; part encodes "
        f"{last['encode_parts_sum_s']:.2f}s in all, longest {last['encode_part_max_s']:.2f}s; "
        f"first part started {last['first_encode_start_after_submit_s']:.2f}s after submit; "
        f"upload to the store (not in the wall) {last['upload_s']:.2f}s.",
        f"Joined/single video bitstream size: {figures['size_ratio']:.4f}; every source "
        f"frame kept in both: {figures['frames_exact']}.",
    ]
    if not figures["frames_exact"]:
        result.error = "the joined output's frame count differs from the single encode's"
    return result


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        figures = main("--quick" in sys.argv)
        print(json.dumps({k: v for k, v in figures.items()
                          if k not in ("single", "jetcut", "single_argv")}, indent=2))
