"""transcode — one web-playable rendition.

Consumes: stages.transcode  StageTask (uses: the input file and the probe step)
Does:     the first video stream (cover art skipped) and the first audio stream, as
          H.264 / HEVC / AV1 in MP4 (``+faststart``) or VP9 in WebM (cues up front); drawn
          as ``shared.media.picture`` says: upright, deinterlaced, square pixels, HDR
          tone-mapped to 8-bit SDR BT.709 (or kept as 10-bit HEVC with ``hdr: keep``), the
          colour tags written; scaled down to fit max_width x max_height keeping the
          displayed aspect ratio with even dimensions; every frame at its own time, or at
          a constant frame rate; metadata stripped. A still picture becomes a ``still_s``
          clip at 25 fps.
Emits:    jobs.stage.complete with outputs {video: jobs/<id>/<step>/video.mp4|video.webm}
          and meta {width, height, vcodec, acodec, container, fps, frames, hdr,
          deinterlaced, still}; ``no_video_stream`` (never retried) for an input without a
          picture.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import ffmpeg

from shared.errors import ErrorCode, PermanentError
from shared.events import StageTask
from shared.geometry import fit
from shared.media import (
    STRIP_METADATA,
    MediaInfo,
    VideoStream,
    encoder_time_base,
    picture,
    step_timeout,
)
from shared.media.runner import Progress
from shared.params.video import TranscodeParams
from shared.stage import StageContext, StageResult, stage

ENCODER = {"h264": "libx264", "hevc": "libx265", "vp9": "libvpx-vp9", "av1": "libaom-av1"}
AUDIO_ENCODER = {"aac": "aac", "opus": "libopus", "mp3": "libmp3lame"}

TRUNCATED_MARKER = ": partial file"
"""What ffmpeg's MP4/MOV demuxer logs when a sample's bytes lie past the end of the file."""

# Speed settings for the encoders without presets. libvpx: "good" at cpu-used 4 is about
# real time at 720p on two cores; libaom: "good" quality's fastest speed (the wrapper's
# cpu-used 8 is clamped to 6 there, so say 6), tiles and row threading for parallelism.
_VP9 = {"deadline": "good", "cpu-used": 4, "row-mt": 1}
_AV1 = {"usage": "good", "cpu-used": 6, "row-mt": 1, "tiles": "2x2"}
STILL_FPS = Fraction(25)
"""Frame rate of a clip made from a still picture."""


async def handle(task: StageTask, ctx: StageContext[TranscodeParams]) -> StageResult:
    p = ctx.params
    media = ctx.probe()
    out_path = ctx.workdir / f"video.{p.container}"
    args, meta = build(p, media, ctx.input_file(), out_path,
                       threads=ctx.services.settings.ffmpeg_threads)
    _, runner = ctx.services.media()
    frames: int | None = None  # video frames written, from ffmpeg's last progress report

    async def progress(pr: Progress) -> None:
        nonlocal frames
        frames = pr.frame if pr.frame is not None else frames
        await ctx.progress(pr.fraction or 0.0)

    # A still picture becomes a clip of still_s seconds: that is the work to time.
    duration = p.still_s if media.still else task.media_duration_s
    timeout = (max(task.timeout_s, step_timeout(ctx.services.settings, p.still_s))
               if media.still else task.timeout_s)
    result = await runner.run(args, duration_s=duration, timeout_s=timeout,
                              on_progress=progress, cancel=ctx.cancel)
    # ffmpeg exits 0 when the demuxer meets the end of the data early: neither a rendition
    # of the first seconds of a cut-off upload nor an empty file may pass for the video.
    if TRUNCATED_MARKER in result.stderr_tail:
        raise PermanentError(ErrorCode.INVALID_INPUT,
                             "the input file is cut off (its index describes more media than "
                             "the file holds): was the upload interrupted?")
    if frames == 0 or not out_path.exists():
        raise PermanentError(ErrorCode.INVALID_INPUT,
                             "no video frame could be decoded from the input")
    return StageResult(files={"video": out_path},
                       meta={**meta, "frames": frames})


def build(p: TranscodeParams, media: MediaInfo, src: Path, dst: Path, *,
          threads: int = 0) -> tuple[list[str], dict[str, Any]]:
    """The ffmpeg arguments (without the binary) for ``p`` on probed ``media``, and the meta
    the step reports. Pure, so benchmarks and tests can see exactly what runs.

    Raises:
        PermanentError: ``no_video_stream`` when the input has no picture to encode.
    """
    video = media.require_video("transcode needs a video")
    ordinal = media.video_ordinal(video)
    # Sizes as ffmpeg's filters see them: autorotation (on by default) turns the frames
    # before our graph, swapping width and height and inverting the pixel aspect ratio.
    in_w, in_h = int(video.width or 0), int(video.height or 0)
    sar = video.sar_ratio
    if video.quarter_turned:
        in_w, in_h, sar = in_h, in_w, 1 / sar
    width, height = fit(max(1, round(in_w * sar)), in_h, p.max_width, p.max_height)

    keep_hdr = p.hdr == "keep" and video.hdr
    pix_fmt = "yuv420p10le" if keep_hdr else "yuv420p"
    source = ffmpeg.input(str(src))
    v = picture.prepare(source[f"v:{ordinal}"], video, keep_hdr=keep_hdr)
    rate = _output_rate(p.fps, video.fps)
    if media.still:
        # One picture shown for still_s seconds: cloned at a constant rate, so players get
        # an ordinary clip (a one-frame MP4 is not one most players will play).
        rate = rate or STILL_FPS
        v = v.filter("tpad", stop_mode="clone", stop_duration=f"{p.still_s:g}")
    if rate is not None:
        v = v.filter("fps", fps=str(rate))  # before scaling: no work on dropped frames
    # scale sets the output SAR so that the picture keeps its displayed shape exactly; with
    # even dimensions that is a ratio like 5769:5776. The second setsar turns it into the
    # source's own pixel shape (1:1 when probe told us the SAR and we fitted for it); the
    # first one pins an unset SAR to 1:1 so that arithmetic holds for every source.
    correction = Fraction(width * in_h, height * in_w) / sar
    v = (v.filter("setsar", r="sar")
          .filter("scale", width, height, **picture.scale_options(video, keep_hdr=keep_hdr))
          .filter("setsar", r=f"sar*{correction.numerator}/{correction.denominator}")
          .filter("format", pix_fmt))
    streams: list[Any] = [v]
    acodec = p.effective_audio_codec if media.has_audio else None
    if acodec is not None:
        streams.append(source["a:0?"])

    out: dict[str, Any] = {"c:v": ENCODER[p.vcodec], "pix_fmt": pix_fmt, **STRIP_METADATA,
                           # Without an fps, keep each frame's own time: MP4's default (cfr at
                           # the stream's nominal rate) duplicates frames of a phone's VFR video.
                           "fps_mode": "vfr" if rate is None else "cfr"}
    crf = p.effective_crf
    if p.vcodec in ("h264", "hevc"):
        out["preset"] = p.effective_preset
        out["profile:v"] = ("high" if p.vcodec == "h264" else
                            "main10" if keep_hdr else "main")
        if crf is not None:
            out["crf"] = crf
    else:
        out.update(_VP9 if p.vcodec == "vp9" else _AV1)
        # libvpx and libaom read crf as a cap unless the target bitrate is 0 (pure quality).
        out["b:v"] = "0" if crf is not None else None
        if crf is not None:
            out["crf"] = crf
    if p.video_bitrate_k is not None:
        out["b:v"] = f"{p.video_bitrate_k}k"
    if p.vcodec == "hevc":
        out["tag:v"] = "hvc1"  # what Apple players need to play HEVC in MP4
        out["x265-params"] = "log-level=error" + (_hdr_x265_params(video) if keep_hdr else "")
    if p.container == "mp4":
        out["movflags"] = "+faststart"
    else:
        out["cues_to_front"] = 1  # WebM's index up front: seekable while downloading
    if acodec is not None:
        out.update({"c:a": AUDIO_ENCODER[acodec], "b:a": f"{p.audio_bitrate_k}k", "ac": 2})
    out.update(_hdr_tags(video) if keep_hdr else picture.SDR_TAGS)
    if media.still:
        out["t"] = f"{p.still_s:g}"
    elif rate is None:
        # VFR kept exact: the encoder counts in the source stream's time base, not 1/fps
        # (see encoder_time_base).
        out["enc_time_base:v"] = encoder_time_base(video)
    if threads:
        out["threads"] = threads
    args = ffmpeg.output(*streams, str(dst), f=p.container,
                         **{k: v for k, v in out.items() if v is not None}).get_args()
    meta = {"width": width, "height": height, "vcodec": p.vcodec, "acodec": acodec,
            "container": p.container, "fps": float(rate) if rate is not None else None,
            "hdr": "kept" if keep_hdr else "tone-mapped" if video.hdr else None,
            "deinterlaced": video.interlaced, "still": media.still}
    return args, meta


def _hdr_tags(video: VideoStream) -> dict[str, str]:
    """Output tags of a kept HDR picture: BT.2020, the source's transfer (PQ or HLG)."""
    return {**picture.HDR_TAGS_KEPT, "color_trc": video.color_transfer or "smpte2084"}


def _hdr_x265_params(video: VideoStream) -> str:
    """The same in the HEVC bitstream's VUI, where players look first."""
    return (f":colorprim=bt2020:transfer={video.color_transfer or 'smpte2084'}"
            ":colormatrix=bt2020nc:range=limited:hdr10-opt=1:repeat-headers=1")


def _output_rate(wanted: float | None, source: float | None) -> Fraction | None:
    """The constant frame rate to convert to: ``wanted``, or the source's own average rate
    when that is lower (never invent frames), as a fraction ffmpeg reads exactly."""
    if wanted is None:
        return None
    rate = Fraction(wanted).limit_denominator(1001)
    if source is not None and 0 < source < wanted:
        rate = Fraction(source).limit_denominator(1001)
    return rate


function = stage("transcode", handle, doc=__doc__ or "")
