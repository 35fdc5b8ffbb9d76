"""Small real media for tests, generated once per session with the real ffmpeg.

Fixtures:
    binaries:   the :class:`~shared.media.Binaries` every test uses (session).
    make_clip:  ``make_clip(name, *, duration=3.0, width=640, height=360, fps=25, ...)`` ->
                path of a clip generated from lavfi ``testsrc2`` + ``sine``, cached by its
                parameters for the whole session (session).
    clip_3s:    the default clip: 3 s, 640x360, 25 fps, H.264 + AAC in MP4 (session).
    text_file:  plain text named ``notes.mp4``: the input every stage must refuse (session).

Helper:
    ffprobe_json(binaries, path) -> dict: ffprobe's JSON for a file, to check outputs.

Generated files are shared by every test in the session: treat them as read-only.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import pytest

from shared.media import Binaries, child_env, find_binaries
from shared.settings import load_settings

__all__ = ["MakeClip", "ffprobe_json"]

_AUDIO_CODECS = {"webm": "libopus", "ogg": "libopus", "mp3": "libmp3lame", "wav": "pcm_s16le"}
_FAST_PRESETS = {"libx264": ["-preset", "ultrafast"], "libx265": ["-preset", "ultrafast"]}


class MakeClip(Protocol):
    def __call__(
        self,
        name: str,
        *,
        duration: float = 3.0,
        width: int = 640,
        height: int = 360,
        fps: int = 25,
        audio: bool = True,
        video: bool = True,
        vcodec: str = "libx264",
        pix_fmt: str = "yuv420p",
        rotate: int | None = None,
        container: str = "mp4",
    ) -> Path: ...


def ffprobe_json(binaries: Binaries, path: str | os.PathLike[str]) -> dict[str, Any]:
    """ffprobe's format and streams for ``path`` (raises if ffprobe fails)."""
    argv = [binaries.ffprobe, "-v", "error", "-print_format", "json"]
    argv += ["-show_format", "-show_streams", str(path)]
    out = subprocess.run(argv, check=True, capture_output=True, timeout=60,
                         env=child_env(binaries))
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def _ffmpeg(binaries: Binaries, *args: str) -> None:
    proc = subprocess.run(
        [binaries.ffmpeg, "-hide_banner", "-nostdin", "-v", "error", "-y", *args],
        capture_output=True,
        timeout=120,
        env=child_env(binaries),
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"clip generation failed ({proc.returncode}): {' '.join(args)}\n"
            + proc.stderr.decode(errors="replace")
        )


MakeFile = Callable[[str, list[str]], Path]
"""``make(name, ffmpeg_args)`` -> the file ffmpeg wrote (args end before the output)."""


def file_maker(binaries: Binaries, root: Path) -> MakeFile:
    """A :data:`MakeFile` writing under ``root``; a name already made is not made again."""

    def make(name: str, args: list[str]) -> Path:
        out = root / name
        if not out.exists():
            _ffmpeg(binaries, *args, "-threads", "2", str(out))
        return out

    return make


@pytest.fixture(scope="session")
def binaries() -> Binaries:
    # JETCUT_FFMPEG / JETCUT_FFPROBE from the environment win, as in production.
    settings = load_settings(
        {k: v for k, v in os.environ.items() if k in ("JETCUT_FFMPEG", "JETCUT_FFPROBE")}
    )
    return find_binaries(settings)


@pytest.fixture(scope="session")
def make_clip(binaries: Binaries, tmp_path_factory: pytest.TempPathFactory) -> MakeClip:
    root = tmp_path_factory.mktemp("clips")
    made: dict[tuple[Any, ...], Path] = {}

    def make(
        name: str,
        *,
        duration: float = 3.0,
        width: int = 640,
        height: int = 360,
        fps: int = 25,
        audio: bool = True,
        video: bool = True,
        vcodec: str = "libx264",
        pix_fmt: str = "yuv420p",
        rotate: int | None = None,
        container: str = "mp4",
    ) -> Path:
        if not (audio or video):
            raise ValueError("a clip needs audio or video")
        key = (name, duration, width, height, fps, audio, video, vcodec, pix_fmt, rotate, container)
        if key in made:
            return made[key]
        digest = hashlib.sha1(repr(key).encode()).hexdigest()[:10]
        target = root / f"{name}-{digest}.{container}"
        partial = target.with_name("partial-" + target.name)
        args: list[str]
        if rotate is not None:
            # -display_rotation is an input option that only survives a stream copy (an
            # encode would autorotate the pixels instead), so rotate a plain clip by remuxing.
            base = make(
                name + "-unrotated",
                duration=duration,
                width=width,
                height=height,
                fps=fps,
                audio=audio,
                video=video,
                vcodec=vcodec,
                pix_fmt=pix_fmt,
                container=container,
            )
            args = ["-display_rotation", str(rotate), "-i", str(base), "-c", "copy"]
            _ffmpeg(binaries, *args, str(partial))
        else:
            args = []
            if video:
                args += ["-f", "lavfi", "-i", f"testsrc2=size={width}x{height}:rate={fps}"]
            if audio:
                args += ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"]
            if video:
                args += ["-c:v", vcodec, *_FAST_PRESETS.get(vcodec, []), "-pix_fmt", pix_fmt]
                args += ["-g", str(fps)]  # a keyframe a second: segmenting tests cut on them
            if audio:
                args += ["-c:a", _AUDIO_CODECS.get(container, "aac")]
            args += ["-t", f"{duration:g}", "-threads", "2"]
            _ffmpeg(binaries, *args, str(partial))
        # Complete files only: a failed or interrupted run never leaves a cached half-clip.
        os.replace(partial, target)
        made[key] = target
        return target

    return make


@pytest.fixture(scope="session")
def clip_3s(make_clip: MakeClip) -> Path:
    return make_clip("clip_3s")


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "notes.mp4"
    path.write_text("These are meeting notes, not a video.\n" * 20)
    return path
