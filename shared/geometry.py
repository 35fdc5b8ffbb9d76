"""Output planning from probed media info: display size, fitting, even dimensions, audio."""

from __future__ import annotations

from typing import Any

from shared.errors import ErrorCode, PermanentError


def fit(width: int, height: int, max_width: int, max_height: int) -> tuple[int, int]:
    """Largest even size within the bounds that keeps the aspect ratio (never upscales).

    Even, because yuv420p (what every player decodes) subsamples chroma by two.
    """
    scale = min(1.0, max_width / width, max_height / height)
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)


def video_stream(media: dict[str, Any]) -> dict[str, Any]:
    """The first video stream of probe metadata (cover art is not video), or
    ``no_video_stream``."""
    for stream in media.get("streams", []):
        if stream.get("codec_type") == "video" and not stream.get("attached_pic"):
            if not stream.get("width") or not stream.get("height"):
                raise PermanentError(ErrorCode.INVALID_INPUT, "the video stream has no size")
            return dict(stream)
    raise PermanentError(ErrorCode.NO_VIDEO_STREAM, "the input has no video stream")


def display_size(video: dict[str, Any]) -> tuple[int, int]:
    """Width and height as shown: swapped for a stream rotated by 90 or 270 degrees
    (ffmpeg auto-rotates on decode, so outputs come out upright at this size)."""
    width, height = int(video["width"]), int(video["height"])
    if abs(int(video.get("rotation") or 0)) % 180 == 90:
        return height, width
    return width, height


def has_audio(media: dict[str, Any]) -> bool:
    return any(s.get("codec_type") == "audio" for s in media.get("streams", []))


def audio_plan(media: dict[str, Any], bitrate_k: int) -> tuple[dict[str, Any], str | None]:
    """ffmpeg-python output options for the first audio stream of an MP4 we make: copy AAC
    as it is, encode anything else to stereo AAC; ``({}, None)`` when there is no audio.
    The second value (``copy``/``aac``/None) is for the step's meta."""
    codecs = [s.get("codec_name") for s in media.get("streams", [])
              if s.get("codec_type") == "audio"]
    if not codecs:
        return {}, None
    if codecs[0] == "aac":
        return {"acodec": "copy"}, "copy"
    return {"acodec": "aac", "audio_bitrate": f"{bitrate_k}k", "ac": 2}, "aac"
