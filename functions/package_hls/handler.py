"""package-hls — HLS VOD for every rendition present, and a master playlist.

Consumes: stages.package-hls  StageTask (``fan_in``; uses: the ``concat`` steps of a ladder,
          whichever of them were not skipped)
Does:     for each rendition, ``-c copy -f hls -hls_playlist_type vod`` cut every
          ``segment_seconds`` (on the encoders' aligned keyframes, so every rendition cuts
          at the same times), MPEG-TS or fMP4 segments. Then a master playlist listing each
          rendition with BANDWIDTH (the peak bitrate of its segments, container included;
          a last segment under half the target length is left out of the peak),
          AVERAGE-BANDWIDTH, RESOLUTION, FRAME-RATE and CODECS, highest first. Every file has
          a unique flat name (``master.m3u8``, ``480p.m3u8``, ``480p_00000.ts``,
          ``480p_init.mp4``), and the playlists name them relatively, so the tree is valid
          exactly as stored under ``jobs/<job>/<step>/``. Each output's logical name *is*
          its file name, so it also plays through the gateway:
          ``/v1/jobs/<job>/outputs/<step>/master.m3u8`` names ``480p.m3u8``, which resolves
          to ``/v1/jobs/<job>/outputs/<step>/480p.m3u8``, and so on down to the segments.
Emits:    jobs.stage.complete with outputs {master.m3u8, <name>.m3u8, <name>_init.mp4
          (fMP4), <name>_00000.ts | .m4s, ...} and meta {master, segment_seconds, segment_type,
          renditions: [{name, playlist, bandwidth, average_bandwidth, resolution, codecs,
          frame_rate, segments, duration_s}]}.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from shared.errors import ErrorCode, FFmpegError, PermanentError
from shared.events import StageTask
from shared.media import STRIP_METADATA_ARGS, Progress
from shared.params.hls import PackageHlsParams
from shared.stage import StageContext, StageResult, stage

_TOKEN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class Playlist:
    """What a media playlist names: its segments (with durations) and an init segment."""

    def __init__(self, text: str) -> None:
        self.segments: list[tuple[str, float]] = []
        self.init: str | None = None
        self.version = 3
        duration: float | None = None
        for raw in text.splitlines():
            line = raw.strip()
            if line.startswith("#EXTINF:"):
                duration = float(line[len("#EXTINF:"):].split(",", 1)[0])
            elif line.startswith("#EXT-X-VERSION:"):
                self.version = int(line[len("#EXT-X-VERSION:"):])
            elif line.startswith("#EXT-X-MAP:"):
                match = re.search(r'URI="([^"]+)"', line)
                self.init = match.group(1) if match else None
            elif line and not line.startswith("#"):
                self.segments.append((line, duration or 0.0))
                duration = None

    @property
    def duration_s(self) -> float:
        return sum(d for _, d in self.segments)


def _renditions(ctx: StageContext[PackageHlsParams]) -> list[tuple[str, Path, dict[str, Any]]]:
    found = []
    for ref, files in ctx.inputs.items():
        if "video" not in files:
            continue
        meta = ctx.meta.get(ref, {})
        name = str(meta.get("rendition") or ref).lower()
        if not _TOKEN.match(name) or name == "master":
            raise PermanentError(ErrorCode.INVALID_RECIPE,
                                 f"rendition name {name!r} (from {ref!r}) must be 1-32 of "
                                 "a-z, 0-9, '-', '_', and not 'master'")
        found.append((name, files["video"], meta))
    if not found:
        raise PermanentError(ErrorCode.INVALID_RECIPE,
                             f"step {ctx.task.step!r} needs concat steps in 'uses'")
    names = [n for n, _, _ in found]
    if len(set(names)) != len(names):
        raise PermanentError(ErrorCode.INVALID_RECIPE, f"rendition names repeat: {names}")
    return sorted(found, key=lambda r: (-int(r[2].get("height") or 0), r[0]))


def master_playlist(entries: list[dict[str, Any]], version: int) -> str:
    lines = ["#EXTM3U", f"#EXT-X-VERSION:{version}", "#EXT-X-INDEPENDENT-SEGMENTS"]
    for e in entries:
        attrs = [f"BANDWIDTH={e['bandwidth']}", f"AVERAGE-BANDWIDTH={e['average_bandwidth']}"]
        if e["resolution"]:
            attrs.append(f"RESOLUTION={e['resolution']}")
        if e["frame_rate"]:
            attrs.append(f"FRAME-RATE={e['frame_rate']:.3f}")
        if e["codecs"]:
            attrs.append(f'CODECS="{e["codecs"]}"')
        lines += ["#EXT-X-STREAM-INF:" + ",".join(attrs), e["playlist"]]
    return "\n".join(lines) + "\n"


async def handle(task: StageTask, ctx: StageContext[PackageHlsParams]) -> StageResult:
    p = ctx.params
    renditions = _renditions(ctx)
    out_dir = ctx.workdir / "hls"
    out_dir.mkdir()
    _, runner = ctx.services.media()
    fmp4 = p.segment_type == "fmp4"
    files: dict[str, Path] = {}
    entries: list[dict[str, Any]] = []
    version = 3
    for i, (name, video, meta) in enumerate(renditions):
        playlist = out_dir / f"{name}.m3u8"
        seg_ext = "m4s" if fmp4 else "ts"
        args = ["-i", str(video), "-map", "0", "-c", "copy", *STRIP_METADATA_ARGS, "-f", "hls",
                "-hls_time", f"{p.segment_seconds:g}", "-hls_playlist_type", "vod",
                "-hls_flags", "independent_segments", "-hls_segment_type", p.segment_type,
                "-hls_segment_filename", str(out_dir / f"{name}_%05d.{seg_ext}")]
        if fmp4:
            args += ["-hls_fmp4_init_filename", f"{name}_init.mp4"]
        args.append(str(playlist))
        duration = meta.get("duration_s")

        async def progress(pr: Progress, done: int = i) -> None:
            await ctx.progress((done + (pr.fraction or 0.0)) / len(renditions))

        await runner.run(args, duration_s=float(duration) if duration else None,
                         timeout_s=task.timeout_s, on_progress=progress, cancel=ctx.cancel)

        listed = Playlist(playlist.read_text())
        version = max(version, listed.version)
        named = [s for s, _ in listed.segments] + ([listed.init] if listed.init else [])
        for ref in named:
            if not _FILE.match(ref) or not (out_dir / ref).is_file():
                raise FFmpegError(ErrorCode.FFMPEG_FAILED, f"{playlist.name} names {ref!r}, "
                                  "which is not a file the packager wrote", non_retryable=True)
        files[playlist.name] = playlist
        if listed.init:
            files[listed.init] = out_dir / listed.init
        rates: list[float] = []
        short: list[float] = []
        total = 0
        for segment, seconds in listed.segments:
            size = (out_dir / segment).stat().st_size
            total += size
            if seconds > 0:
                # A stub last segment (one IDR frame) would claim a peak no player sees.
                full = seconds >= p.segment_seconds / 2
                (rates if full else short).append(size * 8 / seconds)
            files[segment] = out_dir / segment
        rates = rates or short
        width, height = meta.get("width"), meta.get("height")
        entries.append({
            "name": name, "playlist": playlist.name, "init": listed.init,
            "bandwidth": math.ceil(max(rates, default=0)),
            "average_bandwidth": math.ceil(total * 8 / listed.duration_s)
            if listed.duration_s else 0,
            "resolution": f"{width}x{height}" if width and height else None,
            "frame_rate": meta.get("fps") or None, "codecs": meta.get("codecs"),
            "segments": len(listed.segments), "duration_s": round(listed.duration_s, 6),
        })
    master = out_dir / "master.m3u8"
    master.write_text(master_playlist(entries, version))
    files[master.name] = master
    return StageResult(files=files, meta={
        "master": master.name, "segment_seconds": p.segment_seconds,
        "segment_type": p.segment_type, "renditions": entries})


function = stage("package-hls", handle, doc=__doc__ or "")
