"""Which font burnt-in subtitles are drawn with, found without trusting fontconfig.

libass asks fontconfig for fonts, and a machine without any (a slim container) makes it
draw *nothing* while ffmpeg still exits 0: subtitles would silently vanish. So the stage
hands libass a font of its own (the ``fontsdir`` of the ``ass`` filter, loaded from files,
fontconfig or not) and names it in the style; with none to hand, the step fails saying so.

Where a font comes from, first found wins:

1. the ``font-source-sans-pro`` wheel (SIL OFL 1.1), a Python dependency, so every
   install of jetcut has it;
2. DejaVu Sans from Debian's ``fonts-dejavu-core`` (what the Debian images ship);
3. Liberation Sans from Debian's ``fonts-liberation``/``fonts-liberation2``.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ErrorCode, JetcutError


@dataclass(frozen=True)
class Font:
    family: str
    """The family name inside the files: what the ASS style asks libass for."""
    files: tuple[Path, ...]
    """Regular first, then whichever of bold / italic / bold italic exist."""


def _pip_source_sans() -> Path | None:
    try:
        spec = importlib.util.find_spec("font_source_sans_pro")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "files"


def _candidates() -> list[tuple[str, Path | None, tuple[str, ...]]]:
    return [
        ("Source Sans Pro", _pip_source_sans(),
         ("SourceSansPro-Regular.ttf", "SourceSansPro-Bold.ttf", "SourceSansPro-It.ttf",
          "SourceSansPro-BoldIt.ttf")),
        ("DejaVu Sans", Path("/usr/share/fonts/truetype/dejavu"),
         ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf",
          "DejaVuSans-BoldOblique.ttf")),
        ("Liberation Sans", Path("/usr/share/fonts/truetype/liberation"),
         ("LiberationSans-Regular.ttf", "LiberationSans-Bold.ttf",
          "LiberationSans-Italic.ttf", "LiberationSans-BoldItalic.ttf")),
        ("Liberation Sans", Path("/usr/share/fonts/truetype/liberation2"),
         ("LiberationSans-Regular.ttf", "LiberationSans-Bold.ttf",
          "LiberationSans-Italic.ttf", "LiberationSans-BoldItalic.ttf")),
    ]


class NoFont(JetcutError):
    """This worker has no font to draw subtitles with: its installation is incomplete.

    Not retryable here (the same worker would fail the same way); the message says how to
    fix the machine.
    """

    code = ErrorCode.INTERNAL
    non_retryable = True


def find_font() -> Font:
    """The first available font of the list in this module's docstring.

    Raises:
        NoFont: none of them is installed.
    """
    for family, folder, names in _candidates():
        if folder is None or not (folder / names[0]).is_file():
            continue
        return Font(family, tuple(folder / n for n in names if (folder / n).is_file()))
    raise NoFont(
        "no font to draw subtitles with on this worker: install the Python package "
        "'font-source-sans-pro' (a jetcut dependency) or Debian's 'fonts-dejavu-core'")


def stage_fonts(font: Font, folder: Path) -> Path:
    """Copy the font's files into ``folder`` (the only fonts directory libass is given)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in font.files:
        shutil.copyfile(path, folder / path.name)
    return folder
