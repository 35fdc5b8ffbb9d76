"""Picture handling every stage that draws frames shares: the one place that decides how a
source's picture becomes the upright, progressive, square-pixel, SDR BT.709 picture users
expect from ``web``, ``hls``, ``preview``, ``thumbnails`` and ``montage``.

From the probe (:class:`~shared.media.probe.VideoStream`), never from guesses:

* **rotation**: ffmpeg's decoder-side autorotation turns the frames before any graph, so
  graphs see the picture upright; commands that disable it (``-noautorotate``, as the
  segment-parallel encoder does to read parts identically) use :func:`rotate_filters`.
* **interlacing**: a stream whose ``field_order`` says fields (``tt``/``bb``/``tb``/``bt``)
  is deinterlaced with ``bwdif`` (one frame out per frame in, so frame counts and
  timestamps stay the source's).
* **HDR**: PQ (``smpte2084``) and HLG (``arib-std-b67``) are tone-mapped to SDR BT.709
  with ``zscale`` (linearise with 100 nits as SDR white, BT.709 primaries) and
  ``tonemap=mobius`` (linear up to a knee, highlights rolled off: SDR-bright parts keep
  their brightness, where ``hable`` would dim a 100-nit white to grey); the bundled
  ffmpeg has zscale (libzimg). ``keep_hdr`` leaves the picture alone for an encoder
  that writes 10-bit HDR (HEVC Main 10 with the source's tags).
* **pixels** are made square and the colour conversion is done to what the tags will say:
  :func:`scale_options` gives the resize the BT.709 matrix and limited ("tv") range, and
  :data:`SDR_TAGS` writes exactly that into the output, so a player never guesses.

Everything here is pure: it returns ffmpeg filter strings or ffmpeg-python nodes.
"""

from __future__ import annotations

from typing import Any

from shared.media.probe import VideoStream

__all__ = [
    "HDR_TAGS_KEPT",
    "SDR_TAGS",
    "draw",
    "filter_chain",
    "prepare",
    "rotate_filters",
    "scale_filter",
    "scale_options",
    "sdr_filters",
]

SDR_TAGS: dict[str, str] = {"color_primaries": "bt709", "color_trc": "bt709",
                            "colorspace": "bt709", "color_range": "tv"}
"""Output options that tag a video as what jetcut writes by default: SDR BT.709, limited
range. Without them H.264 carries no colour description and players guess (BT.601 for
small pictures), which shifts colours."""

HDR_TAGS_KEPT: dict[str, str] = {"color_primaries": "bt2020", "colorspace": "bt2020nc",
                                 "color_range": "tv"}
"""Tags of a kept HDR output (the transfer, PQ or HLG, is the source's)."""

_ROTATE = {90: ["transpose=cclock"], 180: ["hflip", "vflip"], 270: ["transpose=clock"]}
"""Filters that show a frame as a player would, by counter-clockwise display rotation."""

_ZSCALE_RANGE = {"tv": "limited", "pc": "full"}


def rotate_filters(video: VideoStream) -> list[str]:
    """The filters that turn a frame upright, for commands run with ``-noautorotate``."""
    return list(_ROTATE.get(video.rotation, []))


def deinterlace_filters(video: VideoStream) -> list[str]:
    """``bwdif`` (one frame per frame, field parity from the stream) for interlaced video;
    nothing for progressive or unknown field order."""
    return ["bwdif=mode=send_frame:parity=auto:deint=all"] if video.interlaced else []


def sdr_filters(video: VideoStream) -> list[str]:
    """Tone-map a PQ or HLG picture to SDR BT.709 (8-bit 4:2:0); nothing for SDR.

    The source's transfer, matrix, primaries and range are given to zscale from the probe,
    so a decoder that forgets to tag its frames cannot make zscale assume BT.709.
    """
    if not video.hdr:
        return []
    source = [f"tin={video.color_transfer}",
              f"min={video.color_space or 'bt2020nc'}",
              f"pin={video.color_primaries or 'bt2020'}",
              f"rin={_ZSCALE_RANGE.get(video.color_range or 'tv', 'limited')}"]
    return [
        "zscale=" + ":".join([*source, "t=linear", "npl=100"]),
        "format=gbrpf32le",
        "zscale=p=bt709",
        "tonemap=tonemap=mobius:desat=0",
        "zscale=t=bt709:m=bt709:r=limited",
        "format=yuv420p",
    ]


def filter_chain(video: VideoStream, *, keep_hdr: bool = False,
                 rotate: bool = False) -> list[str]:
    """The filters (as ffmpeg ``-vf`` items) that come before any resize: deinterlacing,
    rotation (only with ``rotate``, for ``-noautorotate`` commands), tone mapping."""
    # Fields are lines of the coded picture: deinterlace before turning it.
    chain = deinterlace_filters(video)
    chain += rotate_filters(video) if rotate else []
    if not keep_hdr:
        chain += sdr_filters(video)
    return chain


def prepare(stream: Any, video: VideoStream, *, keep_hdr: bool = False) -> Any:
    """:func:`filter_chain` applied to an ffmpeg-python video node (autorotated input)."""
    for item in filter_chain(video, keep_hdr=keep_hdr):
        name, _, args = item.partition("=")
        if "=" in args:  # options by name: ffmpeg-python escapes a positional "a=b:c=d"
            stream = stream.filter(name, **dict(o.split("=", 1) for o in args.split(":")))
        else:
            stream = stream.filter(name, *([args] if args else []))
    return stream


def draw(stream: Any, video: VideoStream, width: int, height: int) -> Any:
    """The whole default treatment on an ffmpeg-python node: :func:`prepare`, a resize to
    ``width`` x ``height`` into BT.709 limited range (:func:`scale_options`), square
    pixels. Tag the output with :data:`SDR_TAGS`."""
    return (prepare(stream, video).filter("scale", width, height, **scale_options(video))
            .filter("setsar", 1))


def scale_options(video: VideoStream, *, keep_hdr: bool = False) -> dict[str, str]:
    """Options for the resize (``scale``) that convert the pixels to what
    :data:`SDR_TAGS` says: BT.709 matrix, limited range. The input side is taken from the
    probe when known (a JPEG is full-range BT.601), else what players assume for untagged
    video of that size."""
    if keep_hdr and video.hdr:
        return {}
    options = {"out_color_matrix": "bt709", "out_range": "tv"}
    # Untagged video: what players assume (BT.709 from 720 lines up, BT.601 below), not
    # swscale's BT.601 for everything, so an untagged HD upload keeps the colours a browser
    # showed for it.
    untagged = "bt709" if max(video.display_size) >= 1280 or (video.height or 0) >= 720 \
        else "bt601"
    matrix = _SWS_MATRIX.get(video.color_space or "", untagged)
    if not video.hdr:
        options["in_color_matrix"] = matrix
    if video.color_range in ("tv", "pc") and not video.hdr:
        options["in_range"] = video.color_range
    return options


_SWS_MATRIX = {"bt709": "bt709", "bt470bg": "bt601", "smpte170m": "bt601",
               "fcc": "fcc", "smpte240m": "smpte240m", "bt2020nc": "bt2020",
               "bt2020c": "bt2020"}
"""ffprobe ``color_space`` -> swscale matrix name."""


def scale_filter(width: int, height: int, video: VideoStream, *,
                 keep_hdr: bool = False) -> str:
    """``scale=W:H`` with :func:`scale_options`, as one ``-vf`` item."""
    options = "".join(f":{k}={v}" for k, v in scale_options(video, keep_hdr=keep_hdr).items())
    return f"scale={width}:{height}{options}"
