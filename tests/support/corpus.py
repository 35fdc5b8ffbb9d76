"""A real-world media corpus, made by the bundled ffmpeg, each item checked for its property.

Phone and browser uploads are not the tidy constant-rate H.264 clips most tests use. Each
:class:`Item` here is a tiny (1-3 s, small frames) file carrying one property real uploads
have (jittery VFR timestamps, rotation, SAR != 1, interlacing, HDR, an edit list, ...), written
by a recipe of ffmpeg commands, then *checked with ffprobe to really have that property*: a
change in how ffmpeg writes files can never quietly turn an item into a plain clip.

Items are cached under a directory keyed by a hash of the recipe and the ffmpeg version, so a
second build is instant and a changed recipe is rebuilt. Nothing is downloaded; the public
files (``tests/fixtures/public/``, see its README for attribution) are copied in as they are.

Build or inspect it by hand::

    python -m tests.support.corpus            # build (or reuse) every item, print the table
    python -m tests.support.corpus --dir D    # cache somewhere else (default .jetcut/corpus)

Tests call :func:`build_corpus` once per session (``tests/test_matrix.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from shared.media import Binaries, child_env, find_binaries

__all__ = ["ITEMS", "Built", "CorpusError", "Item", "Probe", "build_corpus"]

ROOT = Path(__file__).resolve().parents[2]
PUBLIC = ROOT / "tests" / "fixtures" / "public"
DEFAULT_DIR = ROOT / ".jetcut" / "corpus"
RECIPE_VERSION = 1
"""Bump to rebuild every item (the hash covers each recipe's commands already)."""


class CorpusError(AssertionError):
    """An item could not be made, or was made without the property it exists for."""


def _exp_golomb(data: bytes, count: int) -> list[int]:
    """The first ``count`` unsigned Exp-Golomb numbers of ``data`` (H.264 slice header)."""
    bits = "".join(f"{b:08b}" for b in data)
    values, at = [], 0
    for _ in range(count):
        zeros = 0
        while bits[at + zeros] == "0":
            zeros += 1
        values.append(int(bits[at + zeros:at + 2 * zeros + 1], 2) - 1)
        at += 2 * zeros + 1
    return values


class Probe:
    """Lazy ffprobe views of one file, for property checks."""

    def __init__(self, binaries: Binaries, path: Path) -> None:
        self.binaries = binaries
        self.path = path

    def _run(self, *args: str) -> str:
        proc = subprocess.run([self.binaries.ffprobe, "-v", "error", *args, str(self.path)],
                              capture_output=True, timeout=60, env=child_env(self.binaries))
        if proc.returncode != 0:
            raise CorpusError(f"ffprobe failed on {self.path.name}: {proc.stderr[-500:]!r}")
        return proc.stdout.decode()

    @cached_property
    def info(self) -> dict[str, Any]:
        out = self._run("-print_format", "json", "-show_format", "-show_streams")
        result: dict[str, Any] = json.loads(out)
        return result

    def streams(self, kind: str) -> list[dict[str, Any]]:
        return [s for s in self.info.get("streams", []) if s.get("codec_type") == kind]

    @property
    def video(self) -> dict[str, Any]:
        found = self.streams("video")
        if not found:
            raise CorpusError(f"{self.path.name} has no video stream")
        return found[0]

    @property
    def audio(self) -> dict[str, Any]:
        found = self.streams("audio")
        if not found:
            raise CorpusError(f"{self.path.name} has no audio stream")
        return found[0]

    @cached_property
    def video_times(self) -> list[float]:
        """Presentation times of the first video stream's packets, in display order."""
        out = self._run("-select_streams", "v:0", "-show_entries", "packet=pts_time",
                        "-of", "csv=p=0")
        return sorted(float(x) for x in out.split() if x not in ("", "N/A"))

    @cached_property
    def decoded_frames(self) -> int:
        out = self._run("-select_streams", "v:0", "-count_frames", "-show_entries",
                        "stream=nb_read_frames", "-of", "csv=p=0")
        return int(out.strip() or 0)

    @cached_property
    def h264_slices(self) -> list[tuple[int, int]]:
        """(NAL unit type, slice type % 5) of every first slice of an H.264 picture, read
        from the Annex B bitstream (5 = IDR; slice type 2 = I, 1 = B)."""
        proc = subprocess.run([self.binaries.ffmpeg, "-v", "error", "-i", str(self.path),
                               "-map", "0:v:0", "-c", "copy", "-bsf:v", "h264_mp4toannexb",
                               "-f", "h264", "-"], capture_output=True, timeout=60,
                              env=child_env(self.binaries))
        if proc.returncode != 0:
            raise CorpusError(f"could not read the H.264 stream of {self.path.name}")
        slices = []
        for nal in proc.stdout.split(b"\x00\x00\x01")[1:]:
            kind = nal[0] & 0x1F if nal else 0
            if kind in (1, 5):
                first_mb, slice_type = _exp_golomb(nal[1:9], 2)
                if first_mb == 0:
                    slices.append((kind, slice_type % 5))
        return slices

    def stream_duration(self, stream: dict[str, Any]) -> float:
        value = stream.get("duration")
        if value in (None, "N/A"):
            raise CorpusError(f"{self.path.name}: stream {stream['index']} has no duration")
        return float(value)


Check = Callable[[Probe], None]


def need(condition: bool, message: str) -> None:
    """Raise :class:`CorpusError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise CorpusError(message)


@dataclass(frozen=True)
class Item:
    """One corpus file: how to make it and how to prove it has its property.

    Attributes:
        name: stable id used by the matrix table (``vfr-webm``, ``rotate-90``, ...).
        prop: the property, as a user would name it.
        filename: file name of the item (its extension is the container).
        steps: ffmpeg argument lists, run in order; ``{prev}`` is the previous step's output,
            and each list ends before the output path. Empty for a public file.
        check: raises :class:`CorpusError` unless the file really has ``prop``.
        public: copied from ``tests/fixtures/public/`` instead of generated.
        kind: ``video``, ``audio``, ``still``, ``broken``: what a user thinks they upload.
    """

    name: str
    prop: str
    filename: str
    steps: tuple[tuple[str, ...], ...]
    check: Check
    kind: str = "video"
    public: bool = False
    audio: bool = True
    """Whether the item carries an audio stream a user would call audio."""

    def key(self, ffmpeg_version: str) -> str:
        recipe = [RECIPE_VERSION, self.name, self.filename, self.steps, ffmpeg_version]
        if self.public:
            recipe.append(hashlib.sha256((PUBLIC / self.filename).read_bytes()).hexdigest())
        return hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Built:
    """A corpus item on disk."""

    item: Item
    path: Path
    cached: bool = field(default=False, compare=False)


# -- building blocks ------------------------------------------------------------------------

W, H = 320, 180


def _v(size: str = f"{W}x{H}", rate: str = "25") -> tuple[str, ...]:
    return ("-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}")


def _a(freq: int = 440) -> tuple[str, ...]:
    return ("-f", "lavfi", "-i", f"sine=frequency={freq}:sample_rate=48000")


X264 = ("-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p")
AAC = ("-c:a", "aac", "-b:a", "64k")
JITTER = "settb=1/1000,setpts='(N*33+mod(N*37\\,13))/1000/TB'"
"""Frame times a browser or phone writes: ~30 fps, each frame 33-45 ms after the last, in
whole milliseconds (MediaRecorder stamps frames as they arrive, not on a grid)."""


def _x265(*extra: str) -> tuple[str, ...]:
    params = ":".join(("log-level=error", *extra))
    return ("-c:v", "libx265", "-preset", "ultrafast", "-x265-params", params, "-tag:v", "hvc1")


def _plain(seconds: float = 2.0, rate: str = "25", size: str = f"{W}x{H}",
           audio: bool = True) -> tuple[str, ...]:
    return (*_v(size, rate), *(_a() if audio else ()), "-t", f"{seconds:g}", *X264,
            "-g", "25", *(AAC if audio else ()))


# -- property checks ------------------------------------------------------------------------

def _deltas_ms(p: Probe) -> list[int]:
    t = p.video_times
    return [round((b - a) * 1000) for a, b in itertools.pairwise(t)]


def _jittery(codec: str) -> Check:
    def check(p: Probe) -> None:
        need(p.video["codec_name"] == codec, f"video codec {p.video['codec_name']} != {codec}")
        deltas = _deltas_ms(p)
        need(len(set(deltas)) >= 3, f"frame intervals too regular: {sorted(set(deltas))}")
        need(all(d > 0 for d in deltas), "frame times not strictly increasing")
        p.audio  # noqa: B018 - raises without audio
    return check


def _gaps(p: Probe) -> None:
    deltas = sorted(_deltas_ms(p))
    median, longest = deltas[len(deltas) // 2], deltas[-1]
    need(longest >= 5 * median, f"no dropped-frame gap: longest {longest} ms, median {median}")


def _rotation(degrees: int) -> Check:
    def check(p: Probe) -> None:
        found = [int(s["rotation"]) for s in p.video.get("side_data_list", [])
                 if "rotation" in s]
        need(bool(found) and found[0] % 360 == degrees,
             f"display matrix rotation {found} is not {degrees}")
    return check


def _sar(p: Probe) -> None:
    v = p.video
    need(v.get("sample_aspect_ratio") not in (None, "1:1", "0:1"),
         f"SAR is {v.get('sample_aspect_ratio')}")
    need(v.get("display_aspect_ratio") == "16:9", f"DAR is {v.get('display_aspect_ratio')}")


def _interlaced(order: str) -> Check:
    def check(p: Probe) -> None:
        v = p.video
        need(v.get("field_order") == order, f"field_order {v.get('field_order')} != {order}")
        need(v["r_frame_rate"] == "30000/1001", f"rate {v['r_frame_rate']}")
    return check


def _hdr(transfer: str) -> Check:
    def check(p: Probe) -> None:
        v = p.video
        got = (v["codec_name"], v["pix_fmt"], v.get("color_primaries"),
               v.get("color_transfer"), v.get("color_space"))
        want = ("hevc", "yuv420p10le", "bt2020", transfer, "bt2020nc")
        need(got == want, f"HDR tags {got} != {want}")
    return check


def _codec(video: str | None, audio: str | None = None, fmt: str | None = None,
           pix_fmt: str | None = None) -> Check:
    def check(p: Probe) -> None:
        if video:
            need(p.video["codec_name"] == video, f"video {p.video['codec_name']} != {video}")
        if pix_fmt:
            need(p.video["pix_fmt"] == pix_fmt, f"pix_fmt {p.video['pix_fmt']} != {pix_fmt}")
        if audio:
            need(p.audio["codec_name"] == audio, f"audio {p.audio['codec_name']} != {audio}")
        if fmt:
            need(fmt in p.info["format"]["format_name"].split(","),
                 f"container {p.info['format']['format_name']} is not {fmt}")
    return check


def _audio_only(codec: str, sample_fmt: str | None = None, bits: int | None = None) -> Check:
    def check(p: Probe) -> None:
        need(not p.streams("video"), "has a video stream (cover art?)")
        a = p.audio
        need(a["codec_name"] == codec, f"audio codec {a['codec_name']} != {codec}")
        if bits is not None:
            need(int(a.get("bits_per_sample") or a.get("bits_per_raw_sample") or 0) == bits,
                 f"not {bits}-bit: {a.get('bits_per_sample')}")
    return check


def _start_time(p: Probe) -> None:
    start = float(p.info["format"].get("start_time", 0))
    need(start >= 10.0, f"start time {start} is not well past zero")
    _codec("mpeg2video", "mp2", "mpegts")(p)


def _edit_list(p: Probe) -> None:
    need(b"elst" in p.path.read_bytes(), "no edit list box")
    packets = int(p.video["nb_frames"])
    need(p.decoded_frames < packets,
         f"the edit list hides nothing: {p.decoded_frames} of {packets} frames shown")


def _open_gop(p: Probe) -> None:
    slices = p.h264_slices
    need(any(kind == 1 and st == 2 for kind, st in slices),
         f"no open-GOP (non-IDR) I picture among {len(slices)}")
    need(any(st == 1 for _, st in slices), "no B pictures to reference across a GOP")


def _lengths(longer: str) -> Check:
    def check(p: Probe) -> None:
        v, a = p.stream_duration(p.video), p.stream_duration(p.audio)
        diff = (a - v) if longer == "audio" else (v - a)
        need(diff >= 1.0, f"{longer} is not clearly longer: video {v:.2f}s, audio {a:.2f}s")
    return check


def _no_audio(p: Probe) -> None:
    p.video  # noqa: B018 - raises without video
    need(not p.streams("audio"), "has audio")


def _two_audio(p: Probe) -> None:
    need(len(p.streams("audio")) == 2, f"{len(p.streams('audio'))} audio streams, not 2")


def _surround(p: Probe) -> None:
    a = p.audio
    need(a["channels"] == 6 and str(a.get("channel_layout", "")).startswith("5.1"),
         f"{a['channels']} channels, layout {a.get('channel_layout')}")


def _one_frame(p: Probe) -> None:
    need(int(p.video.get("nb_frames", 0)) == 1 and p.decoded_frames == 1, "not one frame")


def _still(codec: str) -> Check:
    def check(p: Probe) -> None:
        v = p.video
        need(v["codec_name"] == codec, f"codec {v['codec_name']} != {codec}")
        need(p.decoded_frames == 1, f"{p.decoded_frames} frames, not a still")
    return check


def _animated_gif(p: Probe) -> None:
    need(p.video["codec_name"] == "gif", "not a GIF")
    need(p.decoded_frames > 1, "not animated")


def _rate(rate: str) -> Check:
    def check(p: Probe) -> None:
        v = p.video
        need(v["r_frame_rate"] == rate == v["avg_frame_rate"],
             f"rate {v['r_frame_rate']} / avg {v['avg_frame_rate']} != {rate}")
    return check


def _odd(p: Probe) -> None:
    v = p.video
    need(v["width"] % 2 == 1 and v["height"] % 2 == 1, f"{v['width']}x{v['height']} is even")


def _public(magic: bytes) -> Check:
    """Public files are kept as they are (odd on purpose, so ffprobe may refuse them):
    check they are still the files the README describes, by their magic bytes."""
    def check(p: Probe) -> None:
        need(magic in p.path.read_bytes()[:16], f"does not start with {magic!r}")
    return check


# -- the corpus -----------------------------------------------------------------------------

def _item(name: str, prop: str, filename: str, steps: Iterable[Iterable[str]], check: Check,
          **kw: Any) -> Item:
    return Item(name, prop, filename, tuple(tuple(s) for s in steps), check, **kw)


def _remuxed(base: tuple[str, ...], *options: str) -> list[tuple[str, ...]]:
    """Make ``base``, then stream-copy it with input ``options`` (side data, trims)."""
    return [base, (*options, "-i", "{prev}", "-c", "copy")]


ITEMS: tuple[Item, ...] = (
    _item("h264-aac", "plain H.264/AAC MP4 (control)", "plain.mp4", [_plain()],
          _codec("h264", "aac", "mp4")),
    _item("vfr-webm", "VFR, jittery ms timestamps (MediaRecorder VP8/Opus WebM)",
          "vfr-mediarecorder.webm",
          [(*_v(), *_a(), "-t", "2", "-vf", JITTER, "-fps_mode", "passthrough",
            "-enc_time_base:v", "1/1000", "-c:v", "libvpx", "-deadline", "realtime",
            "-cpu-used", "8", "-b:v", "300k", "-c:a", "libopus")],
          _jittery("vp8")),
    _item("vfr-phone", "VFR, jittery timestamps (phone H.264/AAC MP4, 90 kHz)",
          "vfr-phone.mp4",
          [(*_v(), *_a(), "-t", "2", "-vf", JITTER, "-fps_mode", "passthrough",
            "-enc_time_base:v", "1/90000", "-video_track_timescale", "90000", *X264, *AAC)],
          _jittery("h264")),
    _item("dropped-frames", "dropped-frame gaps (0.33 s and 0.17 s without frames)",
          "dropped-frames.mp4",
          [(*_v(rate="30"), *_a(), "-t", "2",
            "-vf", "select='not(between(n\\,10\\,19))*not(between(n\\,40\\,44))'",
            "-fps_mode", "passthrough", *X264, *AAC)],
          _gaps),
    *(_item(f"rotate-{deg}", f"rotation {deg} (display matrix)", f"rotate-{deg}.mp4",
            _remuxed(_plain(), "-display_rotation", str(deg)), _rotation(deg))
      for deg in (90, 180, 270)),
    _item("sar", "non-square pixels (240x180, SAR 4:3, shown 16:9)", "anamorphic.mp4",
          [(*_v(), *_a(), "-t", "2", "-vf", "scale=240:180,setsar=4/3", *X264, *AAC)], _sar),
    *(_item(f"interlaced-{order}", f"interlaced 29.97 {order} (woven fields, flagged)",
            f"interlaced-{order}.mp4",
            [(*_v(rate="60000/1001"), *_a(), "-t", "2",
              "-vf", f"tinterlace=mode=interleave_{'top' if order == 'tff' else 'bottom'},"
                     f"setfield={order}",
              "-r", "30000/1001", *X264, "-flags", "+ildct+ilme", "-x264-params",
              f"{order}=1", *AAC)],
            _interlaced("tt" if order == "tff" else "bb"))
      for order in ("tff", "bff")),
    *(_item(f"hdr-{name}", f"10-bit HEVC HDR {name.upper()} (BT.2020)", f"hdr-{name}.mp4",
            [(*_v(), *_a(), "-t", "2", "-vf",
              f"zscale=tin=bt709:pin=bt709:min=bt709:t={trc}:p=2020:m=2020_ncl:npl=203,"
              "format=yuv420p10le",
              *_x265("colorprim=bt2020", f"transfer={trc}", "colormatrix=bt2020nc"),
              "-color_primaries", "bt2020", "-color_trc", trc, "-colorspace", "bt2020nc",
              *AAC)],
            _hdr(trc))
      for name, trc in (("pq", "smpte2084"), ("hlg", "arib-std-b67"))),
    _item("hevc-8bit", "HEVC 8-bit MP4", "hevc.mp4",
          [(*_v(), *_a(), "-t", "2", *_x265(), "-pix_fmt", "yuv420p", *AAC)],
          _codec("hevc", "aac", "mp4", "yuv420p")),
    _item("vp9-opus", "VP9 + Opus WebM", "vp9-opus.webm",
          [(*_v(), *_a(), "-t", "2", "-c:v", "libvpx-vp9", "-deadline", "realtime",
            "-cpu-used", "8", "-b:v", "300k", "-c:a", "libopus")],
          _codec("vp9", "opus", "webm")),
    _item("av1", "AV1 + Opus WebM", "av1.webm",
          [(*_v(), *_a(), "-t", "1", "-c:v", "libaom-av1", "-cpu-used", "8", "-row-mt", "1",
            "-b:v", "200k", "-c:a", "libopus")],
          _codec("av1", "opus", "webm")),
    _item("prores", "ProRes 422 Proxy MOV, PCM audio", "prores.mov",
          [(*_v(), *_a(), "-t", "1", "-c:v", "prores_ks", "-profile:v", "0",
            "-c:a", "pcm_s16le")],
          _codec("prores", "pcm_s16le", "mov")),
    _item("mpeg2-ts", "MPEG-2 + MP2 in MPEG-TS, starting at 10 s", "mpeg2.ts",
          [(*_v(), *_a(), "-t", "2", "-c:v", "mpeg2video", "-q:v", "4", "-c:a", "mp2",
            "-output_ts_offset", "10")],
          _start_time),
    _item("edit-list", "MP4 with an edit list (trimmed by stream copy)", "edit-list.mp4",
          [(*_v(), *_a(), "-t", "3", *X264, "-g", "50", *AAC),
           ("-ss", "0.5", "-i", "{prev}", "-c", "copy")],
          _edit_list),
    _item("open-gop", "open-GOP H.264 (non-IDR I frames, B frames across)", "open-gop.mkv",
          [(*_v(), *_a(), "-t", "2", *X264[:2], "-preset", "veryfast", "-x264-params",
            "open-gop=1:keyint=12:min-keyint=12:bframes=3:scenecut=0", "-pix_fmt", "yuv420p",
            *AAC)],
          _open_gop),
    _item("audio-longer", "audio 2.5 s, video 1 s", "audio-longer.mp4",
          [(*_v(), *_a(), "-filter_complex", "[0:v]trim=duration=1[v];[1:a]atrim=duration=2.5[a]",
            "-map", "[v]", "-map", "[a]", *X264, *AAC)],
          _lengths("audio")),
    _item("video-longer", "video 2.5 s, audio 1 s", "video-longer.mp4",
          [(*_v(), *_a(), "-filter_complex", "[0:v]trim=duration=2.5[v];[1:a]atrim=duration=1[a]",
            "-map", "[v]", "-map", "[a]", *X264, *AAC)],
          _lengths("video")),
    _item("no-audio", "video without audio", "no-audio.mp4", [_plain(audio=False)], _no_audio,
          audio=False),
    _item("two-audio", "two audio tracks", "two-audio.mp4",
          [(*_v(), *_a(440), *_a(880), "-t", "2", "-map", "0:v", "-map", "1:a", "-map", "2:a",
            *X264, *AAC)],
          _two_audio),
    _item("surround-51", "5.1 audio", "surround.mp4",
          [(*_v(), "-f", "lavfi", "-i",
            "aevalsrc=" + "|".join(f"0.2*sin({f}*2*PI*t)" for f in (300, 400, 500, 60, 600, 700))
            + ":c=5.1:s=48000", "-t", "2", *X264, "-c:a", "aac", "-b:a", "192k")],
          _surround),
    _item("mp3", "audio only: MP3", "audio.mp3", [(*_a(), "-t", "2", "-c:a", "libmp3lame")],
          _audio_only("mp3"), kind="audio"),
    _item("flac", "audio only: FLAC", "audio.flac", [(*_a(), "-t", "2", "-c:a", "flac")],
          _audio_only("flac"), kind="audio"),
    _item("wav-24bit", "audio only: 24-bit WAV", "audio-24bit.wav",
          [(*_a(), "-t", "2", "-c:a", "pcm_s24le")], _audio_only("pcm_s24le", bits=24),
          kind="audio"),
    _item("one-frame", "a one-frame video", "one-frame.mp4",
          [(*_v(), "-frames:v", "1", *X264)], _one_frame, audio=False),
    _item("still-jpeg", "still image: JPEG", "still.jpg",
          [(*_v(), "-frames:v", "1", "-c:v", "mjpeg", "-q:v", "3")], _still("mjpeg"),
          kind="still", audio=False),
    _item("still-png", "still image: PNG", "still.png",
          [(*_v(), "-frames:v", "1", "-c:v", "png")], _still("png"), kind="still",
          audio=False),
    _item("still-webp", "still image: WebP", "still.webp",
          [(*_v(), "-frames:v", "1", "-c:v", "libwebp")], _still("webp"), kind="still",
          audio=False),
    _item("animated-gif", "animated GIF (10 fps, 1 s)", "animated.gif",
          # The source ends by itself: palettegen waits for the end of its input.
          [("-f", "lavfi", "-i", f"testsrc2=size={W}x{H}:rate=10:duration=1",
            "-vf", "split[a][b];[a]palettegen[p];[b][p]paletteuse", "-c:v", "gif")],
          _animated_gif, audio=False),
    *(_item(f"fps-{label}", f"{label} fps", f"fps-{label}.mp4", [_plain(rate=rate)],
            _rate(rate))
      for label, rate in (("23.976", "24000/1001"), ("59.94", "60000/1001"), ("15", "15/1"))),
    _item("odd-dims", "odd dimensions (321x181, 4:4:4)", "odd.mp4",
          # testsrc2 rounds its size to even; x264 needs 4:4:4 for odd sizes, as screen
          # recorders write them.
          [(*_v(), *_a(), "-t", "2", "-vf", "scale=321:181,setsar=1", "-c:v", "libx264",
            "-preset", "ultrafast", "-pix_fmt", "yuv444p", *AAC)],
          _odd),
    # Public-domain oddities (tests/fixtures/public/README.md): each the least a parser takes.
    _item("public-mp4-audio", "public: 1.5 KB MP4, one 46 ms AAC track", "mp4-with-audio.mp4",
          [], _public(b"ftyp"), public=True, kind="audio"),
    _item("public-mpeg4", "public: 262 B MP4 with no tracks", "Mpeg4.mp4", [],
          _public(b"ftyp"), public=True, kind="broken", audio=False),
    _item("public-flv", "public: 212 B FLV header, no frames", "FlashVideo.flv", [],
          _public(b"FLV"), public=True, kind="broken", audio=False),
    _item("public-png-truncated", "public: PNG cut short", "png-truncated.png", [],
          _public(b"PNG"), public=True, kind="broken", audio=False),
    _item("public-gif", "public: 1x1 transparent GIF", "gif-transparent.gif", [],
          _public(b"GIF8"), public=True, kind="still", audio=False),
    _item("public-jpeg", "public: smallest JPEG (107 B)", "jpeg.jpg", [],
          _public(b"\xff\xd8\xff"), public=True, kind="still", audio=False),
    _item("public-webp", "public: smallest WebP (26 B)", "webp.webp", [],
          _public(b"WEBP"), public=True, kind="still", audio=False),
    _item("public-pdf", "public: a PDF, not media", "pdf.pdf", [], _public(b"%PDF"),
          public=True, kind="broken", audio=False),
)
"""Every corpus item, in the order the matrix report lists them."""


# -- building -------------------------------------------------------------------------------

def ffmpeg_version(binaries: Binaries) -> str:
    out = subprocess.run([binaries.ffmpeg, "-hide_banner", "-version"], capture_output=True,
                         timeout=30, env=child_env(binaries), check=True)
    return out.stdout.decode().splitlines()[0]


def _make(binaries: Binaries, item: Item, target: Path) -> None:
    work = target.parent / f"partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        if item.public:
            shutil.copyfile(PUBLIC / item.filename, work / item.filename)
        prev = ""
        for index, step in enumerate(item.steps):
            out = work / (item.filename if index == len(item.steps) - 1
                          else f"step{index}{Path(item.filename).suffix}")
            argv = [a.replace("{prev}", prev) for a in step]
            proc = subprocess.run(
                [binaries.ffmpeg, "-hide_banner", "-nostdin", "-v", "error", "-y", *argv,
                 "-threads", "2", str(out)],
                capture_output=True, timeout=120, env=child_env(binaries))
            if proc.returncode != 0:
                raise CorpusError(f"making {item.name} failed: "
                                  f"{proc.stderr.decode(errors='replace')[-1500:]}")
            prev = str(out)
        # Complete files only: an interrupted build never leaves a half item in the cache.
        os.replace(work / item.filename, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_item(binaries: Binaries, item: Item, root: Path, version: str) -> Built:
    """Make ``item`` unless its cached copy exists, then check its property either way."""
    target = root / item.key(version) / item.filename
    cached = target.exists()
    if not cached:
        target.parent.mkdir(parents=True, exist_ok=True)
        _make(binaries, item, target)
    try:
        item.check(Probe(binaries, target))
    except CorpusError as exc:
        raise CorpusError(f"{item.name} ({item.prop}): {exc}") from None
    return Built(item, target, cached)


def build_corpus(binaries: Binaries, root: Path = DEFAULT_DIR, *,
                 names: Iterable[str] | None = None, workers: int = 2) -> dict[str, Built]:
    """Build (or reuse) and check corpus items; returns name -> :class:`Built`.

    Args:
        binaries: the ffmpeg/ffprobe pair that makes and checks the items.
        root: cache directory; each item lives under ``<root>/<recipe hash>/``.
        names: only these items (default: all of :data:`ITEMS`).
        workers: items made at once (each ffmpeg runs with two threads).

    Raises:
        CorpusError: an item failed to build or lacks its property.
    """
    wanted = set(names) if names is not None else None
    items = [i for i in ITEMS if wanted is None or i.name in wanted]
    version = ffmpeg_version(binaries)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        built = list(pool.map(lambda i: build_item(binaries, i, root, version), items))
    return {b.item.name: b for b in built}


def corpus_dir() -> Path:
    return Path(os.environ.get("JETCUT_CORPUS_DIR") or DEFAULT_DIR)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.corpus",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=corpus_dir(), help="cache directory")
    parser.add_argument("names", nargs="*", help="only these items")
    args = parser.parse_args(argv)
    built = build_corpus(find_binaries(), args.dir, names=args.names or None)
    width = max(len(n) for n in built)
    for name, b in built.items():
        state = "cached" if b.cached else "built "
        print(f"{name:<{width}}  {state}  {b.path.stat().st_size:>8} B  {b.item.prop}")
    print(f"{len(built)} items, every property checked, in {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
