"""Read untrusted SRT/WebVTT into plain cues, and write them as an ASS script of our own.

The subtitle file a user sends is never handed to ffmpeg: libavformat would sniff its format
(a "subtitle" could be a playlist naming other files), and libass would honour any styling
in it. It is parsed here instead — text only, strict limits, markup reduced to italic, bold,
underline and strike-out — and the ASS script ffmpeg reads is one this module wrote.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

MAX_BYTES = 5 * 1024 * 1024
MAX_CUES = 20_000
MAX_CUE_CHARS = 1_000

_BOMS = ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))
# C0 controls other than tab, LF, FF, CR, and DEL: a text subtitle file has none.
_BINARY = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
_TIME = r"(?:(\d{1,3}):)?([0-5]?\d):([0-5]\d)[,.](\d{1,3})"
_TIMING = re.compile(rf"^\s*{_TIME}\s*-->\s*{_TIME}(?:\s.*)?$")
_TAG = re.compile(r"<\s*(/?)\s*([A-Za-z]+|\d[\d:.]*)[^>]*>")
_STYLE_TAGS = {"i": "i", "b": "b", "u": "u", "s": "s"}


class SubtitleError(ValueError):
    """The file is not a text SRT/WebVTT file we agree to burn."""


@dataclass(frozen=True)
class Cue:
    start_ms: int
    end_ms: int
    text: str
    """ASS-ready text: ``\\N`` line breaks, ``{\\i1}``-style tags only, nothing else special."""


def decode(data: bytes, encoding: str) -> str:
    """Bytes to text, refusing anything that looks binary."""
    if len(data) > MAX_BYTES:
        raise SubtitleError(f"subtitle file is larger than {MAX_BYTES // (1024 * 1024)} MiB")
    for bom, codec in _BOMS:
        if data.startswith(bom):
            data, encoding = data[len(bom):], codec
            break
    if encoding == "utf-16":
        encoding = "utf-16-le"  # no BOM: the common (Windows) byte order
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise SubtitleError(f"subtitle file is not {encoding} text "
                            f"(byte {exc.start}); set the 'encoding' param") from None
    if _BINARY.search(text):
        raise SubtitleError("subtitle file contains control characters: not a text file")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def parse(data: bytes, encoding: str = "utf-8") -> list[Cue]:
    """Cues of an SRT or WebVTT file (WebVTT when it starts with ``WEBVTT``)."""
    text = decode(data, encoding)
    vtt = re.match(r"WEBVTT(?:[ \t].*)?(?:\n|$)", text) is not None
    cues: list[Cue] = []
    for block in re.split(r"\n[ \t]*\n", text):
        lines = block.strip("\n").split("\n")
        index = next((i for i, line in enumerate(lines[:3]) if _TIMING.match(line)), None)
        if index is None:
            continue  # header, NOTE/STYLE/REGION blocks, stray text
        start, end = _timing(lines[index])
        body = "\n".join(lines[index + 1:]).strip()
        if end <= start or not body:
            continue
        cues.append(Cue(start, end, _ass_text(body, vtt)))
        if len(cues) > MAX_CUES:
            raise SubtitleError(f"more than {MAX_CUES} cues")
    if not cues:
        raise SubtitleError("no SRT/WebVTT cues found (expected 'start --> end' lines)")
    return sorted(cues, key=lambda c: (c.start_ms, c.end_ms))


def _timing(line: str) -> tuple[int, int]:
    m = _TIMING.match(line)
    assert m is not None
    g = m.groups()

    def ms(hours: str | None, minutes: str, seconds: str, frac: str) -> int:
        return ((int(hours or 0) * 60 + int(minutes)) * 60 + int(seconds)) * 1000 + \
            int(frac.ljust(3, "0"))

    return ms(*g[:4]), ms(*g[4:])


def _ass_text(body: str, vtt: bool) -> str:
    """Cue text with HTML-like markup mapped to ASS tags and every ASS special defused."""
    body = body[:MAX_CUE_CHARS]
    body = re.sub(r"\{[^}]*\}", "", body)  # ASS override blocks some SRT files carry
    out: list[str] = []
    pos = 0
    for m in _TAG.finditer(body):
        out.append(_plain(body[pos:m.start()], vtt))
        closing, name = m.group(1), m.group(2).lower()
        if name in _STYLE_TAGS:
            out.append(f"{{\\{_STYLE_TAGS[name]}{0 if closing else 1}}}")
        pos = m.end()  # every other tag (font, c, v, lang, ruby, timestamps) is dropped
    out.append(_plain(body[pos:], vtt))
    return "".join(out).strip().replace("\n", "\\N")


def _plain(text: str, vtt: bool) -> str:
    if vtt or "&" in text:
        text = html.unescape(text)
    # Braces open override blocks and a backslash starts \N, \n, \h: none may reach libass
    # as markup. Full-width braces look alike; a zero-width joiner keeps "\" from pairing.
    return (text.replace("\\", "\\\u2060").replace("{", "\uff5b").replace("}", "\uff5d")
            .replace("\t", " ").replace("\u2028", " ").replace("\u2029", " ")
            .replace("\x85", " "))


def ass_time(ms: int) -> str:
    cs = (ms + 5) // 10
    hours, rest = divmod(cs, 360_000)
    minutes, rest = divmod(rest, 6_000)
    seconds, cents = divmod(rest, 100)
    return f"{hours}:{minutes:02d}:{seconds:02d}.{cents:02d}"


def to_ass(cues: list[Cue], *, width: int, height: int, font: str, font_size: float,
           color: str, top: bool, margin: float) -> str:
    """An ASS script drawing ``cues`` on a ``width`` x ``height`` frame (1 unit = 1 pixel).

    Args:
        font: the family name of the font the renderer is given.
        font_size: text height as a fraction of ``height``.
        color: RRGGBB text colour (drawn with a black outline and a soft shadow).
        top: at the top instead of the bottom.
        margin: distance from that edge, a fraction of ``height``.
    """
    size = max(8, round(font_size * height))
    outline = max(1.0, size / 16)
    rr, gg, bb = color[0:2], color[2:4], color[4:6]
    alignment = 8 if top else 2  # numpad positions: top centre / bottom centre
    margin_v = round(margin * height)
    margin_h = round(0.05 * width)
    header = [
        "[Script Info]",
        "ScriptType: v4.00+",
        f"PlayResX: {width}",
        f"PlayResY: {height}",
        "WrapStyle: 0",
        "ScaledBorderAndShadow: yes",
        "",
        "[V4+ Styles]",
        "Format: Name, Fontname, Fontsize, PrimaryColour, SecondaryColour, OutlineColour, "
        "BackColour, Bold, Italic, Underline, StrikeOut, ScaleX, ScaleY, Spacing, Angle, "
        "BorderStyle, Outline, Shadow, Alignment, MarginL, MarginR, MarginV, Encoding",
        f"Style: Default,{font.replace(',', ' ')},{size},&H00{bb}{gg}{rr},&H000000FF,"
        f"&H00000000,&H80000000,0,0,0,0,100,100,0,0,1,{outline:.1f},{outline / 2:.1f},"
        f"{alignment},{margin_h},{margin_h},{margin_v},1",
        "",
        "[Events]",
        "Format: Layer, Start, End, Style, Name, MarginL, MarginR, MarginV, Effect, Text",
    ]
    events = [f"Dialogue: 0,{ass_time(c.start_ms)},{ass_time(c.end_ms)},Default,,0,0,0,,{c.text}"
              for c in cues]
    return "\n".join(header + events) + "\n"
