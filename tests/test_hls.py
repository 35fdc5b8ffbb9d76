"""Recipe ``hls`` end to end through the bus: the ladder, the playlists, every segment.

The HLS tree is checked as it is stored (a listing of ``jobs/<job>/package/``), downloaded
flat and read the way a player reads it: the master names media playlists, the media
playlists name segments, and each segment decodes on its own.

ffprobe of MPEG-TS needs ``GCONV_PATH`` here: the pip static ffmpeg build segfaults when
the TS demuxer decodes the service name through iconv (static glibc cannot load the host's
gconv modules). Players are not affected; see ``ts_env``.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from functions.registry import FUNCTIONS
from shared.errors import PermanentError
from shared.media import Binaries
from shared.params.hls import rung_size
from shared.recipes import resolve
from tests.support.media import MakeClip
from tests.support.nats import running, submit_job, wait_for_job

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def ts_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for ffprobe/ffmpeg reading MPEG-TS with the static build (see above)."""
    empty = tmp_path_factory.mktemp("gconv")
    return {**os.environ, "GCONV_PATH": str(empty)}


def probe(binaries: Binaries, path: Path, env: dict[str, str], *extra: str) -> dict[str, Any]:
    import json

    out = subprocess.run([binaries.ffprobe, "-v", "error", "-print_format", "json",
                          "-show_format", "-show_streams", *extra, str(path)],
                         check=True, capture_output=True, timeout=60, env=env)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def parse_master(text: str) -> list[tuple[dict[str, str], str]]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    assert lines[0] == "#EXTM3U"
    variants = []
    for i, line in enumerate(lines):
        if line.startswith("#EXT-X-STREAM-INF:"):
            attrs = dict(re.findall(r'([A-Z-]+)=("[^"]*"|[^,]*)', line.split(":", 1)[1]))
            variants.append(({k: v.strip('"') for k, v in attrs.items()}, lines[i + 1]))
    return variants


def parse_media(text: str) -> tuple[list[tuple[str, float]], str | None]:
    segments: list[tuple[str, float]] = []
    init = None
    duration = 0.0
    assert "#EXT-X-ENDLIST" in text and "#EXT-X-PLAYLIST-TYPE:VOD" in text
    for line in (raw.strip() for raw in text.splitlines()):
        if line.startswith("#EXTINF:"):
            duration = float(line[8:].split(",")[0])
        elif line.startswith("#EXT-X-MAP:"):
            init = re.search(r'URI="([^"]+)"', line).group(1)  # type: ignore[union-attr]
        elif line and not line.startswith("#"):
            segments.append((line, duration))
    return segments, init


async def download_tree(runtime: Any, job_id: str, step: str, dest: Path) -> set[str]:
    """Every object stored under the step, by file name, into ``dest`` (flat)."""
    store = runtime.services.store
    prefix = f"jobs/{job_id}/{step}/"
    names = set()
    for obj in await store.list(prefix):
        name = obj.key[len(prefix):]
        names.add(name)
        if name != "manifest.json":
            await store.get_file(obj.key, dest / name)
    return names


async def play_over_http(binaries: Binaries, url: str, env: dict[str, str]) -> dict[str, Any]:
    """ffprobe as a player: the master over HTTP, then playlists and segments it names."""
    import json

    proc = await asyncio.create_subprocess_exec(
        binaries.ffprobe, "-v", "error", "-protocol_whitelist", "http,tcp", "-count_frames",
        "-select_streams", "v:0", "-show_entries", "stream=nb_read_frames,width,height",
        "-of", "json", url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


async def test_hls_ladder_end_to_end(make_settings, make_clip: MakeClip, binaries: Binaries,
                                     ts_env: dict[str, str], tmp_path: Path,
                                     http_port: int) -> None:
    clip = make_clip("hls_480p", duration=8.0, width=854, height=480)
    settings = make_settings(concurrency=2, http_port=http_port)
    async with running(settings, list(FUNCTIONS.values())) as rt:
        job_id = await submit_job(rt, [clip], recipe="hls",
                                  params={"segment_seconds": 2, "part_seconds": 2})
        record = await wait_for_job(rt.services, job_id, timeout=100)
        assert record.status == "succeeded", (record.error, {
            n: (s.status, s.error) for n, s in record.steps.items()})
        steps = record.steps
        for name in ("1080p", "720p"):
            assert steps[f"rung_{name}"].status == "skipped"
            assert "upscale" in (steps[f"rung_{name}"].skipped or "")
            assert steps[f"encode_{name}"].status == "skipped"
            assert steps[f"concat_{name}"].status == "skipped"
        for name in ("480p", "360p"):
            assert steps[f"concat_{name}"].status == "done"
            assert len(steps[f"encode_{name}"].parts) == 4  # 8 s in 2 s parts
        assert steps["audio"].attempt == 1 and steps["audio"].status == "done"

        tree = tmp_path / "tree"
        tree.mkdir()
        stored = await download_tree(rt, job_id, "package", tree)

        # The tree also plays through the gateway: logical names are the file names.
        base = f"{settings.base_url}/v1/jobs/{job_id}/outputs/package"
        played = await play_over_http(binaries, f"{base}/master.m3u8", ts_env)
        assert played["streams"][0]["nb_read_frames"] == "200"
        async with httpx.AsyncClient() as client:
            head = await client.get(f"{base}/480p_00000.ts")
            assert head.headers["content-type"] == "video/mp2t"
            head = await client.get(f"{base}/master.m3u8")
            assert head.headers["content-type"] == "application/vnd.apple.mpegurl"

    variants = parse_master((tree / "master.m3u8").read_text())
    assert [uri for _, uri in variants] == ["480p.m3u8", "360p.m3u8"]
    sizes = {uri: attrs["RESOLUTION"] for attrs, uri in variants}
    assert sizes == {"480p.m3u8": "854x480", "360p.m3u8": "640x360"}
    for attrs, _ in variants:
        assert int(attrs["BANDWIDTH"]) >= int(attrs["AVERAGE-BANDWIDTH"]) > 0
        assert re.fullmatch(r"avc1\.64[0-9a-f]{4},mp4a\.40\.2", attrs["CODECS"])
        assert float(attrs["FRAME-RATE"]) == 25.0

    listed = {"master.m3u8", "manifest.json"}
    for _, uri in variants:
        listed.add(uri)
        segments, init = parse_media((tree / uri).read_text())
        assert init is None
        assert abs(sum(d for _, d in segments) - 8.0) <= 0.1
        assert [round(d, 3) for _, d in segments] == [2.0, 2.0, 2.0, 2.0]  # aligned cuts
        for name, _ in segments:
            listed.add(name)
            assert name in stored, f"{uri} names {name}, which is not in the store"
            info = probe(binaries, tree / name, ts_env)
            kinds = sorted(s["codec_type"] for s in info["streams"])
            assert kinds == ["audio", "video"], name
            assert info["format"]["format_name"] == "mpegts"
        # the whole rendition plays: every frame decodes, in order
        played = probe(binaries, tree / uri, ts_env, "-count_frames", "-select_streams", "v",
                       "-protocol_whitelist", "file")
        assert int(played["streams"][0]["nb_read_frames"]) == 200
        assert abs(float(played["format"]["duration"]) - 8.0) <= 0.1
    assert stored == listed  # nothing stored that no playlist names


async def test_small_rotated_silent_source_gets_the_lowest_rung(
        make_settings, make_clip: MakeClip, binaries: Binaries, ts_env: dict[str, str],
        tmp_path: Path) -> None:
    """A source below every rung still gets the lowest one, at its own size; a portrait
    (rotated) source is measured by its short side; no audio means a silent ladder."""
    clip = make_clip("hls_tiny", duration=2.0, width=320, height=176, audio=False, rotate=90)
    async with running(make_settings(concurrency=2), list(FUNCTIONS.values())) as rt:
        job_id = await submit_job(rt, [clip], recipe="hls",
                                  params={"segment_seconds": 1, "ladder": [480, 360]})
        record = await wait_for_job(rt.services, job_id, timeout=60)
        assert record.status == "succeeded", record.error
        assert record.steps["rung_480p"].status == "skipped"
        assert record.steps["rung_360p"].meta["width"] == 176  # displayed upright, not upscaled
        assert record.steps["rung_360p"].meta["height"] == 320
        assert record.steps["audio"].outputs == {}
        tree = tmp_path / "tree"
        tree.mkdir()
        await download_tree(rt, job_id, "package", tree)
    (attrs, uri), = parse_master((tree / "master.m3u8").read_text())
    assert attrs["RESOLUTION"] == "176x320" and "mp4a" not in attrs["CODECS"]
    segments, _ = parse_media((tree / uri).read_text())
    info = probe(binaries, tree / segments[0][0], ts_env)
    assert [s["codec_type"] for s in info["streams"]] == ["video"]
    assert (info["streams"][0]["width"], info["streams"][0]["height"]) == (176, 320)


async def test_fmp4_segments_with_init(make_settings, make_clip: MakeClip, binaries: Binaries,
                                       tmp_path: Path) -> None:
    clip = make_clip("hls_fmp4", duration=4.0, width=640, height=360)
    async with running(make_settings(concurrency=2), list(FUNCTIONS.values())) as rt:
        job_id = await submit_job(rt, [clip], recipe="hls", params={
            "segment_seconds": 2, "ladder": [360], "segment_type": "fmp4"})
        record = await wait_for_job(rt.services, job_id, timeout=60)
        assert record.status == "succeeded", record.error
        assert set(record.steps["package"].outputs) == {
            "master.m3u8", "360p.m3u8", "360p_init.mp4", "360p_00000.m4s", "360p_00001.m4s"}
        tree = tmp_path / "tree"
        tree.mkdir()
        await download_tree(rt, job_id, "package", tree)
    assert "#EXT-X-VERSION:7" in (tree / "master.m3u8").read_text()
    segments, init = parse_media((tree / "360p.m3u8").read_text())
    assert init == "360p_init.mp4" and [s for s, _ in segments] == [
        "360p_00000.m4s", "360p_00001.m4s"]
    for name, _ in segments:  # a player appends each segment to the init segment
        joined = tmp_path / f"{name}.mp4"
        joined.write_bytes((tree / init).read_bytes() + (tree / name).read_bytes())
        info = probe(binaries, joined, dict(os.environ))
        assert sorted(s["codec_name"] for s in info["streams"]) == ["aac", "h264"]


def test_recipe_params_are_validated() -> None:
    plain = {"progressive": False}
    steps = resolve("hls", None, {"ladder": [720, 240], "part_seconds": 10, **plain}, 1)
    assert steps["segment"].params == {"part_seconds": 10}
    assert resolve("hls", None, plain, 1)["segment"].params == {"part_seconds": 12.0}
    assert resolve("hls", None, {"segment_seconds": 20, **plain}, 1)["segment"].params == {
        "part_seconds": 20.0}
    assert steps["rung_240p"].params == {"height": 240, "always": True}
    assert steps["rung_720p"].params == {"height": 720, "always": False}
    assert steps["package"].fan_in and steps["package"].uses == ["concat_720p", "concat_240p"]
    assert "segment" not in steps["encode_240p"].params
    # Progressive (the default): a short first part, audio cut per part, every part a
    # segment, the lowest rung first and at the faster preset.
    steps = resolve("hls", None, {"ladder": [720, 240], "part_seconds": 10}, 1)
    assert steps["segment"].params == {"part_seconds": 10, "first_part_seconds": 2.0,
                                       "audio": True}
    assert resolve("hls", None, {"first_part_seconds": 30}, 1)["segment"].params == {
        "part_seconds": 12.0, "first_part_seconds": 12.0, "audio": True}
    assert [n for n in steps if n.startswith("encode_")] == ["encode_240p", "encode_720p"]
    assert steps["encode_240p"].params["preset"] == "superfast"
    assert steps["encode_720p"].params["preset"] == "veryfast"
    assert resolve("hls", None, {"preset": "ultrafast"}, 1)["encode_360p"].params[
        "preset"] == "ultrafast"  # never slower than asked
    assert all(steps[f"encode_{r}"].params["segment"] for r in ("240p", "720p"))
    for bad in ({"ladder": [360, 360]}, {"ladder": [8]}, {"crf": 60},
                {"segment_seconds": 0.1}, {"segment_type": "dash"}, {"bitrate": 1},
                {"first_part_seconds": 0.1}, {"fast_preset": "instant"}):
        with pytest.raises(PermanentError) as err:
            resolve("hls", None, bad, 1)
        assert err.value.code == "invalid_recipe", bad


@pytest.mark.parametrize(("display", "height", "size"), [
    ((1920, 1080), 720, (1280, 720)),
    ((1280, 720), 480, (854, 480)),  # nearest even width, as ladders have it
    ((854, 480), 360, (640, 360)),
    ((1080, 1920), 720, (720, 1280)),  # portrait: the short side is the rung
    ((853, 480), 1080, (852, 480)),  # never upscaled, never past the source
    ((176, 320), 360, (176, 320)),
])
def test_rung_size(display: tuple[int, int], height: int, size: tuple[int, int]) -> None:
    assert rung_size(*display, height) == size
