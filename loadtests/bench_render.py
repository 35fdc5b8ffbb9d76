"""Render overhead: recipe ``web`` end to end through the HTTP gateway, against plain ffmpeg.

* **jetcut**: every function (gateway included, on a free loopback port) in one in-process
  Runtime on a real nats-server, local store. The clock covers what a client sees: upload
  the clip over HTTP, POST /v1/jobs {"recipe": "web"}, poll GET /v1/jobs/{id} every 50 ms
  until it succeeds, list the outputs and download both (video.mp4, poster.jpg).
* **raw ffmpeg**: the same work the recipe does, as direct commands on the local file:
  ffprobe, then the transcode and the poster extraction run side by side (as the recipe's
  DAG runs them, both after probe), with the argv built exactly as
  functions/transcode and functions/thumbnail build it (ffmpeg-python, same params).

Rounds alternate (raw, jetcut, raw, ...) with the runtime up throughout, so both sides see
the same drift. The clip is 30 s of lavfi ``testsrc2`` 1280x720@25 + a 440 Hz ``sine``,
H.264/AAC, made once and cached; ``--quick`` uses a 10 s one.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import ffmpeg
import httpx
import msgspec

from functions.transcode.handler import build as build_transcode
from loadtests.common import BenchResult, Row, all_functions, nats_server, say, temp_dir
from shared.geometry import fit
from shared.media import Binaries, MediaInfo, find_binaries
from shared.media import probe as probe_media
from shared.media.verify import verify_outputs
from shared.natsserver import free_port
from shared.recipes import RECIPES, decode_params
from shared.runtime import Runtime
from shared.settings import load_settings

NAME = "render"
POLL_S = 0.05
JOB_LIMIT_S = 600.0
CHECK_SETTINGS = load_settings({})
"""Output-check settings at their defaults, as a stage runs them."""
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jetcut-loadtests"


def make_clip(binaries: Binaries, *, duration: int, width: int = 1280, height: int = 720,
              fps: int = 25) -> Path:
    """A test clip with video and audio, generated once and kept in the user's cache dir."""
    CACHE.mkdir(parents=True, exist_ok=True)
    target = CACHE / f"testsrc2-{width}x{height}-{fps}fps-{duration}s.mp4"
    if target.exists():
        return target
    partial = target.with_name(f"partial-{os.getpid()}-{target.name}")
    argv = [binaries.ffmpeg, "-hide_banner", "-nostdin", "-v", "error", "-y",
            "-f", "lavfi", "-i", f"testsrc2=size={width}x{height}:rate={fps}",
            "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000",
            "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-g", str(2 * fps),
            "-c:a", "aac", "-t", str(duration), "-f", "mp4", str(partial)]
    say(f"render: generating a {duration}s {width}x{height} clip (once; cached in {CACHE})")
    subprocess.run(argv, check=True, capture_output=True, timeout=600)
    os.replace(partial, target)
    return target


# --------------------------------------------------------------------------------------------
# raw ffmpeg


def raw_commands(binaries: Binaries, clip: Path, media: MediaInfo,
                 out_dir: Path) -> tuple[list[str], list[str]]:
    """The argv functions/transcode and functions/thumbnail run for recipe ``web``'s params."""
    steps = RECIPES["web"]({})
    # The params each stage gets for recipe web, decoded as the stage decodes them.
    tp: Any = decode_params(steps["transcode"].stage, steps["transcode"].params)
    th: Any = decode_params(steps["poster"].stage, steps["poster"].params)
    src_w, src_h = media.require_video().display_size
    base = [binaries.ffmpeg, "-hide_banner", "-nostdin", "-y"]

    # The transcode stage's own pure command builder, so the peer runs exactly its argv.
    transcode = base + build_transcode(tp, media, clip, out_dir / "video.mp4")[0]

    pw, ph = fit(src_w, src_h, th.max_width, 4320)
    duration = media.duration_s
    # As functions/thumbnail: never seek to the very end (it also stays before the last
    # frame, which for this clip is the same bound).
    at = max(0.0, min(duration * th.at_fraction, duration - 0.1))
    poster = base + ffmpeg.input(str(clip), ss=at).filter("scale", pw, ph).output(
        str(out_dir / "poster.jpg"), vframes=1, **{"q:v": 3}, map_metadata=-1, update=1
    ).get_args()
    return transcode, poster


async def _exec(argv: list[str]) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {err.decode()[-500:]}")
    return out


async def run_raw(binaries: Binaries, clip: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="jetcut-bench-raw-") as tmp:
        out_dir = Path(tmp)
        started = time.perf_counter()
        # The same ffprobe call the probe stage makes (protocol whitelist, probe limits).
        media = await probe_media(binaries, str(clip))
        probed = time.perf_counter()
        transcode, poster = raw_commands(binaries, clip, media, out_dir)

        async def timed(argv: list[str]) -> float:
            t = time.perf_counter()
            await _exec(argv)
            return time.perf_counter() - t

        t_transcode, t_poster = await asyncio.gather(timed(transcode), timed(poster))
        wall = time.perf_counter() - started
        sizes = {p.name: p.stat().st_size for p in out_dir.iterdir()}
        # What the stage contract adds after each encode: the output checks, on this very
        # output (outside the raw wall: raw ffmpeg does not check anything).
        checked = time.perf_counter()
        checks = await verify_outputs(binaries, CHECK_SETTINGS, "transcode",
                                      {"video": out_dir / "video.mp4"},
                                      {":input": {"media": clip}})
        t_checks = time.perf_counter() - checked
    return {"wall_s": wall, "probe_s": probed - started, "transcode_s": t_transcode,
            "poster_s": t_poster, "output_bytes": sizes, "checks_s": t_checks,
            "checks": [msgspec.to_builtins(c) for c in checks],
            "argv": {"transcode": transcode[1:], "poster": poster[1:]}}


# --------------------------------------------------------------------------------------------
# jetcut through the gateway


async def run_interleaved(server_url: str, work: Path, binaries: Binaries, clip: Path,
                          warm: Path, rounds: int, notes: list[str]) -> tuple[
                              list[dict[str, Any]], list[dict[str, Any]]]:
    """Start every function in-process, then alternate raw and jetcut rounds.

    Alternating (raw, jetcut, raw, jetcut, ...) with the runtime up throughout puts both
    sides under the same drift (a shared VM's neighbours, page cache, CPU clocks).
    """
    port = free_port()
    (work / "work").mkdir(parents=True, exist_ok=True)
    settings = load_settings(
        {}, nats_url=server_url, namespace="benchrender", data_dir=str(work / "data"),
        store="local", store_dir=str(work / "store"), work_dir=str(work / "work"),
        http_host="127.0.0.1", http_port=port, allow_anonymous=True,
    )
    functions, why = all_functions(["gateway", "conductor", "probe", "transcode", "thumbnail"])
    if why:
        say(f"  {why}")
        notes.append(why)
    runtime = Runtime(settings, functions, service_name="bench-render")
    await runtime.start()
    base = f"http://127.0.0.1:{port}"
    raw_runs: list[dict[str, Any]] = []
    jet_runs: list[dict[str, Any]] = []
    try:
        async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(60.0)) as client:
            await _wait_healthy(client)
            await run_raw(binaries, warm)
            await _web_job(client, warm, work / "downloads")
            for index in range(rounds):
                raw_runs.append(await run_raw(binaries, clip))
                say(f"  raw round {index + 1}: {raw_runs[-1]['wall_s']:.2f}s "
                    f"(transcode {raw_runs[-1]['transcode_s']:.2f}s)")
                jet_runs.append(await _web_job(client, clip, work / "downloads"))
                j = jet_runs[-1]
                _manifest_delays(work / "store", j)
                say(f"  jetcut round {index + 1}: {j['wall_s']:.2f}s (upload "
                    f"{j['upload_s']:.2f}s, job {j['job_wait_s']:.2f}s, download "
                    f"{j['download_s']:.2f}s; completions applied "
                    f"{_s(j['max_apply_delay_s'])} at worst after the step's manifest)")
    finally:
        await runtime.stop()
    return raw_runs, jet_runs


def _manifest_delays(store_root: Path, run: dict[str, Any]) -> None:
    """How long after a step wrote its manifest (its work done) the conductor applied it."""
    delays = {}
    for step, info in run["steps"].items():
        path = store_root / "jobs" / run["job_id"] / step / "manifest.json"
        if path.exists() and info["finished_at"]:
            made = json.loads(path.read_text())
            delays[step] = {"handler_s": made.get("elapsed_s"),
                            "apply_delay_s": info["finished_at"] - made["created_at"]}
    run["manifests"] = delays
    run["max_apply_delay_s"] = max((d["apply_delay_s"] for d in delays.values()), default=None)


async def _wait_healthy(client: httpx.AsyncClient) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            if (await client.get("/healthz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the gateway did not come up")
        await asyncio.sleep(0.05)


async def _file_chunks(path: Path, size: int = 1 << 20):  # type: ignore[no-untyped-def]
    with path.open("rb") as fh:
        while chunk := await asyncio.to_thread(fh.read, size):
            yield chunk


async def _web_job(client: httpx.AsyncClient, clip: Path, sink: Path) -> dict[str, Any]:
    sink.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    r = await client.post("/v1/uploads", params={"filename": clip.name},
                          content=_file_chunks(clip))
    r.raise_for_status()
    uploaded = time.perf_counter()
    r = await client.post("/v1/jobs", json={"recipe": "web", "input": r.json()["upload_id"]})
    r.raise_for_status()
    job_id = r.json()["job_id"]
    submitted = time.perf_counter()
    deadline = time.monotonic() + JOB_LIMIT_S
    while True:
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} not done after {JOB_LIMIT_S:.0f}s: {job['status']}")
        await asyncio.sleep(POLL_S)
    finished = time.perf_counter()
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}")
    outputs = (await client.get(f"/v1/jobs/{job_id}/outputs")).json()["outputs"]
    sizes: dict[str, int] = {}
    for out in outputs:
        size = 0
        async with client.stream("GET", out["url"]) as resp:
            resp.raise_for_status()
            with (sink / f"{job_id}-{out['name']}").open("wb") as fh:
                async for chunk in resp.aiter_bytes():
                    size += len(chunk)
                    fh.write(chunk)
        sizes[out["name"]] = size
    downloaded = time.perf_counter()
    wall = downloaded - started
    steps = {
        name: {"started_at": s["started_at"], "finished_at": s["finished_at"],
               "run_s": (s["finished_at"] - s["started_at"])
               if s["started_at"] and s["finished_at"] else None}
        for name, s in job["steps"].items()
    }
    return {
        "job_id": job_id, "wall_s": wall, "upload_s": uploaded - started,
        "submit_s": submitted - uploaded, "job_wait_s": finished - submitted,
        "download_s": downloaded - finished,
        "job_created_to_finished_s": job["finished_at"] - job["created_at"],
        "queued_to_first_step_s": (steps["probe"]["started_at"] or 0) - job["created_at"],
        "steps": steps, "output_bytes": sizes,
    }


# --------------------------------------------------------------------------------------------


def run(*, quick: bool) -> BenchResult:
    duration = 10 if quick else 30
    rounds = 1 if quick else 5
    result = BenchResult(name=NAME)
    binaries = find_binaries(load_settings({}))
    clip = make_clip(binaries, duration=duration)
    warm = make_clip(binaries, duration=2)
    result.raw.update({"clip": {"path": str(clip), "bytes": clip.stat().st_size,
                                "duration_s": duration, "size": "1280x720", "fps": 25},
                       "rounds": rounds, "ffmpeg": binaries.ffmpeg})
    say(f"render: raw ffmpeg and jetcut's web recipe, alternating, {rounds} round(s) "
        f"(+1 warm-up each on a 2 s clip)")
    with temp_dir("render") as work, nats_server(work / "nats") as server:
        raw_runs, jet_runs = asyncio.run(run_interleaved(
            server.url, work / "jetcut", binaries, clip, warm, rounds, result.notes))
    result.raw["raw_ffmpeg"] = raw_runs
    result.raw["jetcut"] = jet_runs
    jet = statistics.median(r["wall_s"] for r in jet_runs)
    raw = statistics.median(r["wall_s"] for r in raw_runs)
    result.rows.append(Row(
        benchmark=NAME, metric=f"recipe web, {duration}s 1280x720 clip, wall (median of {rounds})",
        unit="s", jetcut=jet, peer_name="ffprobe + ffmpeg transcode ∥ poster", peer=raw,
        target_op="<=", target=1.15,
    ))
    checks = statistics.median(r["checks_s"] for r in raw_runs)
    encode = statistics.median(r["transcode_s"] for r in raw_runs)
    result.rows.append(Row(
        benchmark=NAME, metric=f"output checks of the web transcode ({duration}s 720p), "
        f"median of {rounds}", unit="s", jetcut=checks, peer_name="the transcode itself",
        peer=encode, target_op="<=", target=0.10,
    ))
    last = jet_runs[-1]
    step_s = {k: v["run_s"] for k, v in last["steps"].items()}
    result.notes += [
        "jetcut's wall covers upload over HTTP, submit, the job (probe, then transcode and "
        "poster in parallel, each downloading its input from the store and uploading its "
        "outputs), 50 ms status polling, and downloading both outputs over HTTP. The raw "
        "wall covers ffprobe, then transcode and poster run side by side, on the file in "
        "place.",
        f"Last jetcut round: upload {last['upload_s']:.2f}s, submit {last['submit_s']:.3f}s, "
        f"job {last['job_wait_s']:.2f}s (created -> finished "
        f"{last['job_created_to_finished_s']:.2f}s, "
        f"queued -> probe running {last['queued_to_first_step_s']:.3f}s; step run times "
        + ", ".join(f"{k} {_s(v)}" for k, v in step_s.items())
        + f"), download {last['download_s']:.2f}s.",
        f"Last raw round: probe {raw_runs[-1]['probe_s']:.3f}s, transcode "
        f"{raw_runs[-1]['transcode_s']:.2f}s, poster {raw_runs[-1]['poster_s']:.2f}s.",
        "Per round, jetcut / raw wall: " + ", ".join(
            f"{j['wall_s']:.2f}/{r['wall_s']:.2f}s" for j, r in zip(jet_runs, raw_runs,
                                                                   strict=True)) + ".",
        "Completion pick-up (a step's manifest written -> the conductor applies its "
        "completion to the job record), worst hop of each round: "
        + ", ".join(_s(r["max_apply_delay_s"]) for r in jet_runs)
        + ". Step run times in the job record include it; the raw side has no such hop.",
        "Handler time per step (download input, run, upload outputs; from the manifests) in "
        "the last round: " + ", ".join(
            f"{k} {_s(v['handler_s'])}" for k, v in last.get("manifests", {}).items()) + ".",
        "Output checks (shared/media/verify.py, default settings) timed on each raw "
        "round's transcode output, against that transcode: with checks a transcode step "
        "takes the sum, without them the encode alone. Jetcut's wall above includes them. "
        "Last round's checks: " + ", ".join(
            f"{c['check']} {'ok' if c['passed'] else 'FAILED'}"
            + (f" ({c['measured'].get('metric')} {c['measured'].get('score')})"
               if c["check"] == "quality" else "") for c in raw_runs[-1]["checks"]) + ".",
        "Rounds alternate raw and jetcut with the runtime up throughout. ffmpeg threads: "
        "left to ffmpeg on both sides (JETCUT_FFMPEG_THREADS=0); jetcut runs ffmpeg at nice "
        "+10, the raw commands at the default niceness.",
    ]
    return result


def _s(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}s"
