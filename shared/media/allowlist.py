"""What jetcut agrees to read: demuxer and codec allowlists for untrusted input, and the
output options that keep a source's metadata out of what we publish.

An allowlist, not a denylist: ffmpeg has demuxers that open other files or URLs named inside
the input (HLS and DASH playlists, ``ffconcat`` lists, SDP, image sequences, ``tee``...), and
new ones appear with new ffmpeg builds. Only plain media containers, whose bytes are the
media, are on the list. ffmpeg and ffprobe enforce it themselves through their
``format_whitelist`` option (checked right after format detection, before a demuxer reads
anything), so a playlist named ``holiday.mp4`` is refused, never sniffed and followed.
"""

from __future__ import annotations

import re

__all__ = [
    "AUDIO_CODECS",
    "FORMAT_WHITELIST",
    "INPUT_FORMATS",
    "STRIP_METADATA",
    "STRIP_METADATA_ARGS",
    "VIDEO_CODECS",
    "codec_allowed",
    "format_allowed",
    "refused_format",
]

INPUT_FORMATS = frozenset({
    # containers
    "mov", "matroska", "mpegts", "mpeg", "avi", "flv", "asf", "ogg", "mxf", "dv", "ivf",
    # raw audio and elementary streams
    "wav", "w64", "aiff", "caf", "mp3", "aac", "flac", "ac3", "eac3", "h264", "hevc",
    # single pictures (cover art, watermarks, stills). image2 reads one file here: every
    # path jetcut hands ffmpeg is built from minted ids, never with a % or glob pattern.
    "image2", "png_pipe", "jpeg_pipe", "bmp_pipe", "webp_pipe", "tiff_pipe", "gif",
})
"""Demuxers an untrusted input may be read with (ffmpeg's names; ``mov`` covers mp4/m4a/3gp,
``matroska`` covers webm)."""

FORMAT_WHITELIST = ",".join(sorted(INPUT_FORMATS))
"""``INPUT_FORMATS`` as the value of ffmpeg's and ffprobe's ``-format_whitelist``."""

VIDEO_CODECS = frozenset({
    "h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mpeg2video", "mpeg1video", "h263",
    "mjpeg", "prores", "dnxhd", "theora", "vc1", "wmv3", "dvvideo", "ffv1", "rawvideo",
    "png", "bmp", "gif", "webp", "tiff",
})
AUDIO_CODECS = frozenset({
    "aac", "mp3", "mp2", "opus", "vorbis", "flac", "alac", "ac3", "eac3", "dts", "wmav2",
    "amr_nb", "amr_wb",
})
"""Decoders jetcut points at untrusted bytes (plus every ``pcm_*``): the common, well-fuzzed
ones. Subtitle, data and attachment streams are never decoded, so they are not checked."""

STRIP_METADATA = {"map_metadata": -1, "map_metadata:s": -1, "map_chapters": -1}
"""ffmpeg-python output options that publish none of the source's metadata: global tags
(title, GPS ``location``, comments), per-stream tags (``-map_metadata -1`` alone keeps
those, handler names and languages included) and chapters with their titles."""

STRIP_METADATA_ARGS = ["-map_metadata", "-1", "-map_metadata:s", "-1", "-map_chapters", "-1"]
""":data:`STRIP_METADATA` as plain arguments, for commands built without ffmpeg-python."""

_NOT_ON_WHITELIST = re.compile(r"\[(\w+) @ 0x[0-9a-f]+\] Format not on whitelist")


def format_allowed(format_name: str) -> bool:
    """True when ffprobe's ``format_name`` (``mov,mp4,m4a,...``) names an allowed demuxer."""
    return not INPUT_FORMATS.isdisjoint(format_name.split(","))


def codec_allowed(codec_type: str, codec_name: str | None) -> bool:
    """True when a stream of this type may be decoded (other stream types always pass)."""
    if codec_type == "video":
        return codec_name in VIDEO_CODECS
    if codec_type == "audio":
        return codec_name is not None and (codec_name in AUDIO_CODECS
                                           or codec_name.startswith("pcm_"))
    return True


def refused_format(stderr: str) -> str | None:
    """The demuxer ffmpeg/ffprobe detected and refused for not being on the whitelist
    (``hls``, ``concat``, ``sdp``...), from its stderr; ``None`` when nothing was refused."""
    match = _NOT_ON_WHITELIST.search(stderr)
    if match:
        return match.group(1)
    return "unknown" if "Format not on whitelist" in stderr else None
