"""Render overhead: recipe ``web`` end to end through the HTTP gateway, against plain ffmpeg.

* **jetcut**: every function (gateway included, on a free loopback port) in one in-process
  Runtime on a real nats-server, local store. The clock covers what a client sees: upload
  the clip over HTTP, POST /v1/jobs {"recipe": "web"}, poll GET /v1/jobs/{id} every 50 ms
  until it succeeds, list the outputs and download both (video.mp4, poster.jpg).
* **raw ffmpeg**: the same work the recipe does, as direct commands on the local file:
  ffprobe, then the transcode and the poster extraction run side by side (as the recipe's
  DAG runs them, both after probe), with the argv built exactly as
  functions/transcode and functions/thumbnail build it (ffmpeg-python, same params).

* **jetcut without output checks**: the same, on a second runtime whose settings turn the
  output checks off (``JETCUT_OUTPUT_CHECKS=false``): what the checks cost a job is the
  difference, and the transcode step's own time with and without them (from the step
  manifests) is the check cost as a share of the stage's encode.

Rounds alternate (raw, jetcut with checks, jetcut without, raw, ... with the two jetcut
sides swapping places every round) with both runtimes up throughout, so every side sees the
same drift. The clip is 30 s of lavfi ``testsrc2`` 1280x720@25 + a 440 Hz ``sine``,
H.264/AAC, made once and cached; ``--quick`` uses a 10 s one. A full run (5 rounds) takes
about 3 minutes on 2 quiet cores.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
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


async def _exec(argv: list[str]) -> str:
    """Run ``argv``; its stderr."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {err.decode()[-500:]}")
    return err.decode(errors="replace")


_BENCH = re.compile(r"bench: utime=([\d.]+)s stime=([\d.]+)s")


def _children_cpu_s() -> float:
    """CPU seconds (user + system) of every finished child process so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def run_raw(binaries: Binaries, clip: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="jetcut-bench-raw-") as tmp:
        out_dir = Path(tmp)
        started = time.perf_counter()
        # The same ffprobe call the probe stage makes (protocol whitelist, probe limits).
        media = await probe_media(binaries, str(clip))
        probed = time.perf_counter()
        transcode, poster = raw_commands(binaries, clip, media, out_dir)

        async def timed(argv: list[str]) -> tuple[float, str]:
            t = time.perf_counter()
            err = await _exec(argv)
            return time.perf_counter() - t, err

        # -benchmark only prints the process's own CPU time at the end (the transcode's
        # share of the CPU, apart from the poster's that runs beside it).
        (t_transcode, err), (t_poster, _) = await asyncio.gather(
            timed([transcode[0], "-benchmark", *transcode[1:]]), timed(poster))
        wall = time.perf_counter() - started
        cpu = _BENCH.search(err)
        transcode_cpu = float(cpu.group(1)) + float(cpu.group(2)) if cpu else None
        sizes = {p.name: p.stat().st_size for p in out_dir.iterdir()}
        # What the stage contract adds after each encode: the output checks, on this very
        # output (outside the raw wall: raw ffmpeg does not check anything).
        # Nothing else runs meanwhile: the children's CPU time is the checks' own.
        checked, cpu_before = time.perf_counter(), _children_cpu_s()
        checks = await verify_outputs(binaries, CHECK_SETTINGS, "transcode",
                                      {"video": out_dir / "video.mp4"},
                                      {":input": {"media": clip}})
        t_checks = time.perf_counter() - checked
        checks_cpu = _children_cpu_s() - cpu_before
    return {"wall_s": wall, "probe_s": probed - started, "transcode_s": t_transcode,
            "poster_s": t_poster, "output_bytes": sizes, "checks_s": t_checks,
            "transcode_cpu_s": transcode_cpu, "checks_cpu_s": checks_cpu,
            "checks": [msgspec.to_builtins(c) for c in checks],
            "argv": {"transcode": transcode[1:], "poster": poster[1:]}}


# --------------------------------------------------------------------------------------------
# jetcut through the gateway


SIDES = {"checked": True, "unchecked": False}
"""The two jetcut runtimes: label -> whether their stages check outputs."""


async def run_interleaved(server_url: str, work: Path, binaries: Binaries, clip: Path,
                          warm: Path, rounds: int, notes: list[str]) -> tuple[
                              list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Start every function in two in-process runtimes (output checks on and off), then
    alternate raw and jetcut rounds.

    Alternating (raw, checked, unchecked, raw, unchecked, checked, ...) with both runtimes
    up throughout puts every side under the same drift (a shared VM's neighbours, page
    cache, CPU clocks).
    """
    functions, why = all_functions(["gateway", "conductor", "probe", "transcode", "thumbnail"])
    if why:
        say(f"  {why}")
        notes.append(why)
    runtimes: dict[str, Runtime] = {}
    clients: dict[str, httpx.AsyncClient] = {}
    raw_runs: list[dict[str, Any]] = []
    jet_runs: dict[str, list[dict[str, Any]]] = {label: [] for label in SIDES}
    try:
        for label, checks in SIDES.items():
            port = free_port()
            root = work / label
            (root / "work").mkdir(parents=True, exist_ok=True)
            settings = load_settings(
                {}, nats_url=server_url, namespace=f"benchrender{label}",
                data_dir=str(root / "data"), store="local", store_dir=str(root / "store"),
                work_dir=str(root / "work"), http_host="127.0.0.1", http_port=port,
                allow_anonymous=True, output_checks=checks,
            )
            runtimes[label] = Runtime(settings, functions, service_name=f"bench-render-{label}")
            await runtimes[label].start()
            clients[label] = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                               timeout=httpx.Timeout(60.0))
            await _wait_healthy(clients[label])
        await run_raw(binaries, warm)
        for label in SIDES:
            await _web_job(clients[label], warm, work / label / "downloads")
        for index in range(rounds):
            raw_runs.append(await run_raw(binaries, clip))
            say(f"  raw round {index + 1}: {raw_runs[-1]['wall_s']:.2f}s "
                f"(transcode {raw_runs[-1]['transcode_s']:.2f}s, its checks "
                f"{raw_runs[-1]['checks_s']:.2f}s)")
            order = list(SIDES) if index % 2 == 0 else list(reversed(SIDES))
            for label in order:
                j = await _web_job(clients[label], clip, work / label / "downloads")
                _manifest_delays(work / label / "store", j)
                jet_runs[label].append(j)
                say(f"  jetcut ({label}) round {index + 1}: {j['wall_s']:.2f}s (upload "
                    f"{j['upload_s']:.2f}s, job {j['job_wait_s']:.2f}s, download "
                    f"{j['download_s']:.2f}s; transcode step "
                    f"{_s(j['manifests'].get('transcode', {}).get('handler_s'))}; "
                    f"completions applied {_s(j['max_apply_delay_s'])} at worst after the "
                    "step's manifest)")
    finally:
        for client in clients.values():
            await client.aclose()
        for runtime in runtimes.values():
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
        raw_runs, sides = asyncio.run(run_interleaved(
            server.url, work / "jetcut", binaries, clip, warm, rounds, result.notes))
    jet_runs, bare_runs = sides["checked"], sides["unchecked"]
    result.raw["raw_ffmpeg"] = raw_runs
    result.raw["jetcut"] = jet_runs
    result.raw["jetcut_without_checks"] = bare_runs
    raw = statistics.median(r["wall_s"] for r in raw_runs)
    for label, runs in (("output checks on", jet_runs), ("output checks off", bare_runs)):
        result.rows.append(Row(
            benchmark=NAME, metric=f"recipe web, {duration}s 1280x720 clip, wall, {label} "
            f"(median of {rounds})", unit="s", jetcut=statistics.median(r["wall_s"] for r in runs),
            peer_name="ffprobe + ffmpeg transcode ∥ poster", peer=raw,
            target_op="<=", target=1.10,
        ))
    checks = statistics.median(r["checks_s"] for r in raw_runs)
    encode = statistics.median(r["transcode_s"] for r in raw_runs)
    result.rows.append(Row(
        benchmark=NAME, metric=f"output checks of the web transcode ({duration}s 720p), timed "
        f"alone after it, median of {rounds}", unit="s", jetcut=checks,
        peer_name="the transcode itself", peer=encode, target_op="<=", target=0.10,
    ))
    cpu_runs = [r for r in raw_runs if r["transcode_cpu_s"]]
    if cpu_runs:
        result.rows.append(Row(
            benchmark=NAME, metric=f"CPU time of those output checks (user + system, all their "
            f"processes), median of {len(cpu_runs)}", unit="s",
            jetcut=statistics.median(r["checks_cpu_s"] for r in cpu_runs),
            peer_name="the transcode's CPU time",
            peer=statistics.median(r["transcode_cpu_s"] for r in cpu_runs),
            target_op="<=", target=0.10,
            note="less sensitive than wall time to other load on the machine",
        ))
    on = _step_times(jet_runs, "transcode")
    off = _step_times(bare_runs, "transcode")
    if on and off:
        result.rows.append(Row(
            benchmark=NAME, metric=f"transcode step with checks minus without (handler time, "
            f"median of {rounds} each)", unit="s",
            jetcut=statistics.median(on) - statistics.median(off),
            peer_name="the transcode step without checks", peer=statistics.median(off),
            target_op="<=", target=0.10,
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
        "takes the sum, without them the encode alone. The same cost seen from inside jetcut: "
        "the transcode step's handler time (download, encode, checks, upload; from the step "
        "manifests) on the runtime with checks minus the one without. Per round, transcode "
        "step with/without checks: " + ", ".join(
            f"{_s(a)}/{_s(b)}" for a, b in zip(on, off, strict=False)) + "; job wall with/"
        "without checks: " + ", ".join(
            f"{a['wall_s']:.2f}/{b['wall_s']:.2f}s" for a, b in zip(jet_runs, bare_runs,
                                                                   strict=True)) + ". "
        "Last round's checks: " + ", ".join(
            f"{c['check']} {'ok' if c['passed'] else 'FAILED'}"
            + (f" ({c['measured'].get('metric')} {c['measured'].get('score')})"
               if c["check"] == "quality" else "") for c in raw_runs[-1]["checks"]) + ".",
        "Rounds alternate raw, jetcut with checks and jetcut without (the two jetcut sides "
        "swap places every round) with both runtimes up throughout. ffmpeg threads: "
        "left to ffmpeg on both sides (JETCUT_FFMPEG_THREADS=0); jetcut runs ffmpeg at nice "
        "+10, the raw commands at the default niceness.",
    ]
    return result


def _step_times(runs: list[dict[str, Any]], step: str) -> list[float]:
    """A step's handler time in each run, from its manifest (runs without one skipped)."""
    times = [r.get("manifests", {}).get(step, {}).get("handler_s") for r in runs]
    return [t for t in times if t is not None]


def _s(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}s"
