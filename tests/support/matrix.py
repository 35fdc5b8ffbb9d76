"""Every recipe x every corpus item: what a user should get, and a runner that checks it.

:data:`EXPECTED` is the one table of outcomes (``docs/media.md`` mirrors it, and
``tests/test_matrix.py`` checks that it does): each cell is ``ok`` (the job succeeds and every
output passes its checks) or the specific error code the job must fail with, fast and never
retried. The table says what a user *should* get, not what today's code happens to do.

``tests/test_matrix.py`` runs, in ``make test``, every property through the recipes it matters
for (:data:`MATTERS`); ``make matrix`` runs every cell and writes
``loadtests/reports/matrix.md``::

    python -m tests.support.matrix --report loadtests/reports/matrix.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from shared.media import Binaries, child_env, find_binaries
from shared.natsserver import NatsServer
from shared.runtime import Runtime
from shared.settings import Settings, load_settings
from tests.support.corpus import ITEMS, Built, build_corpus, corpus_dir

__all__ = ["EXPECTED", "MATTERS", "RECIPES", "Cell", "Outcome", "expected", "run_cells"]

OK = "ok"
NOV = "no_video_stream"
NOA = "no_audio_stream"
BAD = "invalid_input"

RECIPES = ("web", "hls", "thumbnails", "preview", "gif", "audio", "montage", "watermark",
           "subtitles")
"""Every built-in recipe. ``watermark`` gets a PNG logo and ``subtitles`` an SRT file as the
job's second input; ``montage`` gets the item as its only clip."""

_VIDEO = (OK, OK, OK, OK, OK, OK, OK, OK, OK)
_SILENT_VIDEO = (OK, OK, OK, OK, OK, NOA, OK, OK, OK)
_AUDIO_ONLY = (NOV, NOV, NOV, NOV, NOV, OK, NOV, NOV, NOV)
NS = "not_supported"
_STILL = (OK, NS, OK, OK, OK, NOA, OK, OK, OK)
"""A still image makes a poster, thumbnails and a still-image clip (``web``, and through the
same picture handling a preview, a montage clip, a watermarked or subtitled clip); a
segmented HLS ladder of one picture is refused (``not_supported``, naming the recipes that
fit)."""
GAPS: dict[tuple[str, str], str] = {}
"""Known gaps: what a user gets TODAY where the right answer is another (none now). A cell
found wrong is stated here, with why, so that ``make test`` proves the rest and shows the day
it is fixed."""
_BROKEN = (BAD,) * 9

EXPECTED: dict[str, tuple[str, ...]] = {
    # item                   web  hls  thumbnails preview gif audio montage watermark subtitles
    "h264-aac": _VIDEO,
    "vfr-webm": _VIDEO,
    "vfr-phone": _VIDEO,
    "dropped-frames": _VIDEO,
    "rotate-90": _VIDEO,
    "rotate-180": _VIDEO,
    "rotate-270": _VIDEO,
    "sar": _VIDEO,
    "interlaced-tff": _VIDEO,
    "interlaced-bff": _VIDEO,
    "hdr-pq": _VIDEO,
    "hdr-hlg": _VIDEO,
    "hevc-8bit": _VIDEO,
    "vp9-opus": _VIDEO,
    "av1": _VIDEO,
    "prores": _VIDEO,
    "mpeg2-ts": _VIDEO,
    "edit-list": _VIDEO,
    "open-gop": _VIDEO,
    "audio-longer": _VIDEO,
    "video-longer": _VIDEO,
    "no-audio": _SILENT_VIDEO,
    "two-audio": _VIDEO,
    "surround-51": _VIDEO,
    "mp3": _AUDIO_ONLY,
    "flac": _AUDIO_ONLY,
    "wav-24bit": _AUDIO_ONLY,
    "one-frame": _SILENT_VIDEO,
    "still-jpeg": _STILL,
    "still-png": _STILL,
    "still-webp": _STILL,
    "animated-gif": _SILENT_VIDEO,
    "fps-23.976": _VIDEO,
    "fps-59.94": _VIDEO,
    "fps-15": _VIDEO,
    "odd-dims": _VIDEO,
    "public-mp4-audio": _AUDIO_ONLY,
    "public-mpeg4": _BROKEN,    # an MP4 with no tracks: nothing to decode
    "public-flv": _BROKEN,      # a bare FLV header
    "public-png-truncated": _BROKEN,
    "public-gif": _STILL,       # 1x1 transparent GIF
    "public-jpeg": _BROKEN,     # no picture data the decoder accepts
    # Probe finds a (bogus) picture and no audio; no decoder gets a frame out of it.
    "public-webp": (BAD, BAD, BAD, BAD, BAD, NOA, BAD, BAD, BAD),
    "public-pdf": _BROKEN,
}
"""Item -> outcome per recipe, in :data:`RECIPES` order (with :data:`GAPS` applied)."""
for (_item, _recipe), _code in GAPS.items():
    _row = list(EXPECTED[_item])
    _row[RECIPES.index(_recipe)] = _code
    EXPECTED[_item] = tuple(_row)

_PICTURE = ("web", "hls", "thumbnails", "preview", "montage")
_TIMING = ("web", "hls")
_AUDIO_LAYOUT = ("web", "hls", "audio")
MATTERS: dict[str, tuple[str, ...]] = {
    "h264-aac": RECIPES,
    **{n: _TIMING for n in ("vfr-phone", "dropped-frames", "mpeg2-ts", "edit-list",
                             "open-gop", "fps-23.976", "fps-59.94", "fps-15", "one-frame")},
    # Overlays redraw every frame: they must keep a browser recording's own timestamps.
    "vfr-webm": (*_TIMING, "watermark", "subtitles"),
    **{n: _PICTURE for n in ("rotate-90", "rotate-180", "rotate-270", "sar", "interlaced-tff",
                              "interlaced-bff", "hdr-pq", "hdr-hlg", "odd-dims")},
    **{n: ("web",) for n in ("hevc-8bit", "vp9-opus", "av1", "prores")},
    **{n: _AUDIO_LAYOUT for n in ("audio-longer", "video-longer", "no-audio", "two-audio",
                                   "surround-51")},
    **{n: ("web", "audio") for n in ("mp3", "flac", "wav-24bit", "public-mp4-audio")},
    **{n: ("web", "thumbnails", "hls") for n in ("still-jpeg", "still-png", "still-webp",
                                                 "animated-gif", "public-gif")},
    **{n: ("web", "audio") for n in ("public-mpeg4", "public-flv", "public-png-truncated",
                                     "public-jpeg", "public-pdf")},
    # Probed as a picture that nothing decodes: the graphs with a second input (a logo, a
    # montage's silence) must still refuse it rather than write an empty file.
    "public-webp": ("web", "audio", "montage", "watermark"),
}
"""The recipes each property matters for: what ``make test`` runs (``make matrix`` runs all)."""


def expected(item: str, recipe: str) -> str:
    return EXPECTED[item][RECIPES.index(recipe)]


@dataclass(frozen=True)
class Cell:
    item: str
    recipe: str

    @property
    def expected(self) -> str:
        return expected(self.item, self.recipe)


@dataclass(frozen=True)
class Outcome:
    """What one job did: ``ok`` or its error code, and whatever makes it wrong."""

    cell: Cell
    got: str
    seconds: float
    problems: tuple[str, ...] = ()
    message: str = ""
    checks: tuple[dict[str, Any], ...] = ()

    @property
    def passed(self) -> bool:
        return self.got == self.cell.expected and not self.problems


def cells(names: Iterable[str] | None = None, *, every: bool = False) -> list[Cell]:
    """Cells of :data:`MATTERS` (or every cell), in table order."""
    wanted = set(names) if names is not None else None
    return [Cell(item.name, recipe) for item in ITEMS
            if wanted is None or item.name in wanted
            for recipe in (RECIPES if every else MATTERS[item.name])]


# -- second inputs --------------------------------------------------------------------------

SRT = "1\n00:00:00,000 --> 00:00:01,500\nHello from the matrix\n\n2\n00:00:01,500 --> " \
      "00:00:03,000\nSecond cue\n"


def companions(binaries: Binaries, root: Path) -> dict[str, Path]:
    """The second inputs of ``watermark`` (a small PNG logo) and ``subtitles`` (an SRT)."""
    root.mkdir(parents=True, exist_ok=True)
    logo, subs = root / "logo.png", root / "subs.srt"
    if not logo.exists():
        partial = root / f"partial-{os.getpid()}-logo.png"
        subprocess.run([binaries.ffmpeg, "-v", "error", "-y", "-f", "lavfi", "-i",
                        "color=c=red@0.5:size=48x24,format=rgba", "-frames:v", "1",
                        str(partial)], check=True, capture_output=True, timeout=60,
                       env=child_env(binaries))
        os.replace(partial, logo)
    subs.write_text(SRT)
    return {"watermark": logo, "subtitles": subs}


def job_of(recipe: str) -> tuple[dict[str, Any], bool]:
    """(params, needs a companion input) for one cell's job: small, fast settings."""
    fast = {"preset": "ultrafast"}
    params: dict[str, dict[str, Any]] = {
        "web": {**fast},
        "hls": {"ladder": [360], "preset": "ultrafast"},
        "thumbnails": {"count": 3},
        "preview": {"duration_s": 1.0, "width": 160},
        "gif": {"duration_s": 1.0, "width": 160},
        "audio": {},
        "montage": {"clips": 1, "width": 320, "height": 180, **fast},
        "watermark": {},
        "subtitles": {},
    }
    return params[recipe], recipe in ("watermark", "subtitles")


# -- running --------------------------------------------------------------------------------

async def run_cell(runtime: Runtime, built: Built, cell: Cell, extra: dict[str, Path], *,
                   timeout: float = 120.0) -> Outcome:
    """Submit one job through the real bus and judge what it did."""
    from tests.support.nats import submit_job, wait_for_job

    params, companion = job_of(cell.recipe)
    inputs = [built.path, extra[cell.recipe]] if companion else [built.path]
    started = time.monotonic()
    job_id = await submit_job(runtime, inputs, recipe=cell.recipe, params=params)
    assert runtime.services is not None
    record = await wait_for_job(runtime.services, job_id, timeout=timeout)
    seconds = time.monotonic() - started
    problems: list[str] = []
    checks: list[dict[str, Any]] = []
    if record.status == "succeeded":
        got, message = OK, ""
        for name, step in record.steps.items():
            if step.status not in ("done", "skipped"):
                problems.append(f"step {name} ended {step.status}")
            for check in step.checks:
                checks.append({"step": name, **msgspec.to_builtins(check)})
                if not check.passed:
                    problems.append(f"step {name}: check {check.check} failed")
        if not any(step.outputs for step in record.steps.values()):
            problems.append("succeeded without outputs")
    else:
        got = record.error.code if record.error else str(record.status)
        message = record.error.message if record.error else ""
        retried = sorted(n for n, s in record.steps.items() if s.attempt > 1)
        if retried:
            problems.append(f"retried (steps {retried}): not a fast, permanent failure")
    return Outcome(cell, got, round(seconds, 2), tuple(problems), message, tuple(checks))


async def run_cells(runtime: Runtime, corpus: dict[str, Built], todo: list[Cell],
                    extra: dict[str, Path], *, parallel: int = 4) -> list[Outcome]:
    """Run ``todo`` with at most ``parallel`` jobs in flight; outcomes in ``todo`` order."""
    gate = asyncio.Semaphore(parallel)

    async def one(cell: Cell) -> Outcome:
        async with gate:
            try:
                return await run_cell(runtime, corpus[cell.item], cell, extra)
            except AssertionError as exc:  # the job never settled
                return Outcome(cell, "timeout", 0.0, (str(exc)[:300],))

    return list(await asyncio.gather(*(one(c) for c in todo)))


def mismatches(outcomes: list[Outcome]) -> dict[str, str]:
    """``item x recipe`` -> what went wrong, for every cell that is not as expected."""
    return {f"{o.cell.item} x {o.cell.recipe}":
            f"expected {o.cell.expected}, got {o.got}"
            + (f" ({'; '.join(o.problems)})" if o.problems else "")
            + (f": {o.message[:160]}" if o.got != o.cell.expected and o.message else "")
            for o in outcomes if not o.passed}


def report(outcomes: list[Outcome], elapsed_s: float) -> str:
    """The matrix as markdown: recipe x property -> ok / code, mismatches marked."""
    by = {(o.cell.item, o.cell.recipe): o for o in outcomes}
    props = {i.name: i.prop for i in ITEMS}
    lines = [
        "# Recipe x input matrix",
        "",
        "Written by `make matrix` (`python -m tests.support.matrix`): every built-in recipe",
        "through every corpus item (`tests/support/corpus.py`), each a real job through the bus.",
        "A cell is `ok` (succeeded, every output check passed) or the error code the job failed",
        "with. **✗** marks a cell that differs from the expected table (`tests/support/matrix.py`,",
        "mirrored in `docs/media.md`), with the expectation after the arrow.",
        "",
        f"{len(outcomes)} cells, {sum(o.passed for o in outcomes)} as expected, "
        f"{elapsed_s:.0f} s wall time.",
        "",
        "| item | property | " + " | ".join(RECIPES) + " |",
        "|---|---|" + "---|" * len(RECIPES),
    ]
    for item in ITEMS:
        row = []
        for recipe in RECIPES:
            o = by.get((item.name, recipe))
            if o is None:
                row.append("")
            elif o.passed:
                row.append(o.got)
            else:
                row.append(f"✗ {o.got} → {o.cell.expected}")
        if any(row):
            lines.append(f"| {item.name} | {props[item.name]} | " + " | ".join(row) + " |")
    bad = mismatches(outcomes)
    if bad:
        lines += ["", "## Cells not as expected", ""]
        lines += [f"- `{k}`: {v}" for k, v in bad.items()]
    return "\n".join(lines) + "\n"


@contextlib.asynccontextmanager
async def standalone(data: Path) -> AsyncIterator[Runtime]:
    """A nats-server and every function in this process, as ``jetcut dev`` runs them."""
    from functions.registry import FUNCTIONS

    server = NatsServer(data / "nats", server_name="jetcut-matrix")
    server.start()
    try:
        settings: Settings = load_settings(
            {}, nats_url=server.url, namespace="matrix", data_dir=str(data / "data"),
            store="local", store_dir=str(data / "store"), work_dir=str(data / "work"),
            http_port=0, concurrency=2)
        (data / "work").mkdir(exist_ok=True)
        runtime = Runtime(settings, list(FUNCTIONS.values()), service_name="matrix")
        await runtime.start()
        try:
            yield runtime
        finally:
            await runtime.stop()
    finally:
        server.stop()


async def _main(args: argparse.Namespace) -> int:
    binaries = find_binaries()
    corpus = build_corpus(binaries, args.corpus)
    todo = cells(args.items or None, every=not args.fast)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="jetcut-matrix-") as tmp:
        extra = companions(binaries, Path(tmp) / "companions")
        async with standalone(Path(tmp)) as runtime:
            outcomes = await run_cells(runtime, corpus, todo, extra, parallel=args.parallel)
    text = report(outcomes, time.monotonic() - started)
    if args.report:
        args.report.write_text(text)
    print(text)
    return 0 if all(o.passed for o in outcomes) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.matrix",
                                     description="Run every recipe over every corpus item.")
    parser.add_argument("--report", type=Path, help="write the markdown table here")
    parser.add_argument("--corpus", type=Path, default=corpus_dir(), help="corpus cache")
    parser.add_argument("--parallel", type=int, default=4, help="jobs in flight")
    parser.add_argument("--fast", action="store_true", help="only the cells make test runs")
    parser.add_argument("items", nargs="*", help="only these corpus items")
    return asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
