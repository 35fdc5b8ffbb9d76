"""The title card: which font draws it, and how its text is laid out and kept inert.

User text never enters the filter graph. Each line is written to its own file in the
step's work dir and drawn with ``drawtext=textfile=...:expansion=none``: no quoting level
of the filtergraph (``:``, ``'``, ``\\``, ``,``, ``;``, ``[``) and no ``%{...}`` expansion
ever sees it, so it can neither inject filter options nor be evaluated. That is stricter
than escaping, which would have to get three nested syntaxes right for every character.
"""

from __future__ import annotations

import importlib.util
import shutil
import textwrap
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ErrorCode, PermanentError

FONT_PACKAGE = ("font_source_sans_pro", "SourceSansPro-Regular.ttf")
"""The pip package (``font-source-sans-pro``, SIL OFL 1.1) whose font draws titles: a
dependency of jetcut (the ``subtitles`` stage draws with it too), so every install has a
font whatever the OS image carries."""

SYSTEM_FONTS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",  # Debian/Ubuntu fonts-dejavu-core
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/liberation2/LiberationSans-Regular.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",  # Fedora
    "/usr/share/fonts/TTF/DejaVuSans.ttf",  # Arch
    "/System/Library/Fonts/Supplemental/Arial.ttf",  # macOS, for `jetcut dev` on a laptop
)
"""Fallbacks, in order, for an install without the font package."""

LINE_SPACING = 1.25


def find_font(package: tuple[str, str] | None = FONT_PACKAGE,
              system_fonts: tuple[str, ...] = SYSTEM_FONTS) -> Path:
    """The font file titles are drawn with: the package's, else the first system font.

    Raises:
        PermanentError: ``internal`` when no font exists on this worker; the message says
            what to install. Not retried: another delivery would land on the same image.
    """
    if package is not None:
        try:
            spec = importlib.util.find_spec(package[0])
        except (ImportError, ValueError):
            spec = None
        for root in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(root, "files", package[1])
            if candidate.is_file():
                return candidate
    for name in system_fonts:
        if Path(name).is_file():
            return Path(name)
    raise PermanentError(
        ErrorCode.INTERNAL,
        "no font to draw the title card with on this worker: install jetcut's "
        "dependencies (the Python package font-source-sans-pro) or a system font such as "
        "Debian's fonts-dejavu-core; montages without a title do not need one",
    )


def clean_text(text: str) -> str:
    """Printable text only: control characters go, tabs become spaces, newlines stay."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    return "".join(c for c in text if c == "\n" or unicodedata.category(c)[0] != "C").strip()


@dataclass(frozen=True)
class Layout:
    lines: list[str]
    font_size: int
    baselines: list[int]
    """y of each line's baseline; drawtext places a line with ``y = baseline - ascent``."""


def layout(text: str, width: int, height: int, font_size: int | None) -> Layout:
    """Wrap ``text`` to the card and pick a size that fits (when none is given).

    Character widths are estimated (0.55 em), which is close for Latin sans-serif text;
    lines are centred one by one, so an estimate off by a few characters only changes
    where a line breaks, never pushes text off a 10 % margin.
    """
    size = font_size or max(12, height // 12)
    while True:
        per_line = max(4, int(width * 0.9 / (size * 0.55)))
        lines = [wrapped for paragraph in clean_text(text).split("\n")
                 for wrapped in (textwrap.wrap(paragraph, per_line, break_long_words=True,
                                               break_on_hyphens=False) or [""])]
        step = size * LINE_SPACING
        if font_size is not None or len(lines) * step <= height * 0.9 or size <= 12:
            break
        size = max(12, int(size * 0.85))
    while lines and not lines[-1]:
        lines.pop()
    top = (height - len(lines) * step) / 2
    baselines = [round(top + i * step + 0.8 * step) for i in range(len(lines))]
    return Layout(lines=lines, font_size=size, baselines=baselines)


def stage_font(font: Path, workdir: Path) -> Path:
    """The font under a plain name in the work dir: an installation path may hold
    filtergraph metacharacters (``[``, ``,``, ``'``), escapable but better not there at all."""
    target = workdir / f"title-font{font.suffix.lower()}"
    try:
        target.symlink_to(font)
    except OSError:
        shutil.copyfile(font, target)
    return target


def write_lines(lines: list[str], workdir: Path) -> list[Path]:
    """One text file per line, the only way user text reaches drawtext."""
    paths = []
    for i, line in enumerate(lines):
        path = workdir / f"title-{i}.txt"
        path.write_text(line, encoding="utf-8")
        paths.append(path)
    return paths
