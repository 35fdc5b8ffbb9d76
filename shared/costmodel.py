"""The cost model: how many compute-seconds a step will take, predicted before it runs.

Pure maths, no I/O (``shared.costbook`` keeps the coefficients in KV). A step's cost is

    seconds = overhead + rate * units

where ``units`` is the step's work measured from the probe and its params (seconds of
media, times output megapixels and frame rate for the stages that encode video), and
``overhead`` and ``rate`` are kept per stage and *parameter class* (source codec, preset):
the things that change the seconds per unit of work by a factor, which no linear term in
``units`` could capture. Each (stage, class) keeps its last measured samples; the fit is
robust (Theil-Sen: the median of pairwise slopes), so one step slowed by a noisy neighbour
cannot drag the coefficients, and it is recomputed from the samples, so old behaviour ages
out as new samples arrive. A cold start uses a prior per stage, scaled by the samples'
median ratio to it until the samples span enough sizes of work to fit a slope.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable
from typing import Any

import msgspec

from shared.jobstate import ACTIVE_JOB, FINISHED_STEP, JobRecord, StepStatus, input_ref_index
from shared.media.probe import MediaInfo

MAX_SAMPLES = 32
"""Samples kept per (stage, class): enough for a median, few enough for one KV value."""
MAX_ERRORS = 64
"""Relative errors of past predictions kept per (stage, class), for the accuracy report."""
SPREAD_TO_FIT = 2.0
"""A slope is fitted only when the largest sample has this many times the smallest's units."""
MIN_TO_FIT = 4

ENCODING_STAGES = frozenset({"transcode", "encode-part", "watermark", "subtitles", "montage"})
"""Stages whose work grows with output pixels and frame rate (they encode video)."""

PRESET_FACTOR = {
    "ultrafast": 0.35, "superfast": 0.5, "veryfast": 1.0, "faster": 1.4, "fast": 1.8,
    "medium": 2.3, "slow": 3.5, "slower": 7.0, "veryslow": 15.0,
}
"""x264 presets' cost relative to ``veryfast`` (the default), for the prior only."""

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


class Coefficients(msgspec.Struct, frozen=True, kw_only=True):
    """``seconds = overhead_s + rate_s * units``, for one (stage, class)."""

    overhead_s: float
    rate_s: float

    def seconds(self, units: float) -> float:
        return max(0.0, self.overhead_s + self.rate_s * units)


PRIORS: dict[str, Coefficients] = {
    # An encode of 1 s of 30 fps 1 MP video at veryfast takes ~0.3 s on two cores; every
    # stage also pays for ffmpeg's start, its downloads, uploads and output checks.
    **{s: Coefficients(overhead_s=0.8, rate_s=0.3) for s in ENCODING_STAGES},
    "noop": Coefficients(overhead_s=0.02, rate_s=0.0),
    "rendition": Coefficients(overhead_s=0.02, rate_s=0.0),
    "probe": Coefficients(overhead_s=0.2, rate_s=0.005),  # per MB of input (its download)
    "segment": Coefficients(overhead_s=0.4, rate_s=0.01),
    "concat": Coefficients(overhead_s=0.4, rate_s=0.01),
    "package-hls": Coefficients(overhead_s=0.4, rate_s=0.01),
    "audio-extract": Coefficients(overhead_s=0.4, rate_s=0.02),
    "loudnorm": Coefficients(overhead_s=0.5, rate_s=0.05),
    "thumbnail": Coefficients(overhead_s=0.5, rate_s=0.01),
    "preview": Coefficients(overhead_s=0.5, rate_s=0.02),
}
DEFAULT_PRIOR = Coefficients(overhead_s=0.5, rate_s=0.05)


class Work(msgspec.Struct, frozen=True, kw_only=True):
    """What a step will do, as the cost model sees it."""

    stage: str
    cls: str
    """Parameter class: source codec and preset, one KV-safe token."""
    units: float
    preset: str | None = None

    @property
    def key(self) -> str:
        """The KV key of this work's coefficients: ``<stage>.<class>``."""
        return f"{self.stage}.{self.cls}"


class CostEntry(msgspec.Struct, kw_only=True):
    """What KV keeps per (stage, class): recent samples and how wrong predictions were."""

    samples: list[tuple[float, float]] = []
    """``(units, seconds)`` of the last measured steps, oldest first."""
    errors: list[float] = []
    """``|predicted - measured| / measured`` of the predictions made before each sample."""
    count: int = 0
    """Samples seen in all (the list keeps the last ``MAX_SAMPLES``)."""
    seen: list[str] = []
    """Ids of the last samples (task id and delivery), so a redelivered completion is not
    counted twice."""


def _token(value: object) -> str:
    text = _UNSAFE.sub("_", str(value or "none")).strip("_")
    return text[:24] or "none"


def _num(value: Any, default: float) -> float:
    return float(value) if isinstance(value, int | float) and value > 0 else default


def work_of(stage: str, params: dict[str, Any], info: MediaInfo | None,
            part: tuple[int, int] | None = None, input_mb: float | None = None) -> Work:
    """The work of one step (or one part of an expanded step), from the probe and params.

    Args:
        stage: the step's stage.
        params: the step's params as the recipe resolved them.
        info: the job's probe result; None before the probe ran (the work is then one
            unit: the prediction is the stage's overhead).
        part: ``(index, count)`` for a part of an expanded step: it does 1/count of the media.
        input_mb: megabytes of the job inputs the step reads, where known: the work of a
            ``probe``, which runs before anything else is known (mostly its download).
    """
    if stage == "probe":
        return Work(stage=stage, cls="none-none",
                    units=round(max(0.01, input_mb), 6) if input_mb is not None else 1.0)
    preset = params.get("preset") if isinstance(params.get("preset"), str) else None
    video = info.video if info is not None else None
    codec = video.codec_name if video is not None else (
        info.audio.codec_name if info is not None and info.audio is not None else None)
    cls = f"{_token(codec)}-{_token(preset)}"
    if info is None:
        return Work(stage=stage, cls=cls, units=1.0, preset=preset)
    media_s = _num(info.duration_s, 1.0)
    if stage == "preview":
        media_s = min(media_s, _num(params.get("duration_s"), 3.0))
    if part is not None and part[1] > 0:
        media_s /= part[1]
    units = media_s
    if stage in ENCODING_STAGES and video is not None:
        width, height = _num(video.width, 1280.0), _num(video.height, 720.0)
        out_h = min(height, _num(params.get("height"), _num(params.get("max_height"), height)))
        scale = out_h / height
        megapixels = max(0.05, width * height * scale * scale / 1e6)
        fps = min(_num(params.get("fps"), _num(video.fps, 30.0)), _num(video.fps, 30.0))
        units = media_s * megapixels * fps / 30.0
    return Work(stage=stage, cls=cls, units=round(units, 6), preset=preset)


def prior(work: Work) -> Coefficients:
    """The cold-start coefficients of a stage (scaled by its preset for the encoders)."""
    base = PRIORS.get(work.stage, DEFAULT_PRIOR)
    factor = PRESET_FACTOR.get(work.preset or "veryfast", 1.0) if work.stage in ENCODING_STAGES \
        else 1.0
    return Coefficients(overhead_s=base.overhead_s, rate_s=base.rate_s * factor)


def fit(samples: list[tuple[float, float]], start: Coefficients) -> Coefficients:
    """Coefficients from measured ``(units, seconds)`` samples, robustly.

    With enough samples spread over sizes of work: Theil-Sen (median pairwise slope, then
    the median intercept). Otherwise ``start`` (the stage's pooled fit, or its prior)
    scaled by the median ratio of measured to predicted seconds, which converges on
    repeated work of one size. Without samples: ``start``.
    """
    if not samples:
        return start
    units = [u for u, _ in samples]
    lo, hi = min(units), max(units)
    if len(samples) >= MIN_TO_FIT and lo > 0 and hi >= SPREAD_TO_FIT * lo:
        slopes = [(s2 - s1) / (u2 - u1)
                  for i, (u1, s1) in enumerate(samples) for u2, s2 in samples[i + 1:]
                  if abs(u2 - u1) >= 0.1 * (hi - lo)]
        rate = statistics.median(slopes) if slopes else 0.0
        if rate > 0:
            overhead = statistics.median(s - rate * u for u, s in samples)
            if overhead < 0:  # no negative fixed cost: refit through the origin
                overhead, rate = 0.0, statistics.median(s / u for u, s in samples)
            return Coefficients(overhead_s=overhead, rate_s=rate)
    ratios = [s / p for u, s in samples if (p := start.seconds(u)) > 0]
    factor = statistics.median(ratios) if ratios else 1.0
    return Coefficients(overhead_s=start.overhead_s * factor, rate_s=start.rate_s * factor)


POOL = "_all"
"""The class of a stage's pooled entry (a real class never starts with ``_``)."""


def _preset_scale(work: Work) -> float:
    base = PRIORS.get(work.stage, DEFAULT_PRIOR)
    return prior(work).rate_s / base.rate_s if base.rate_s > 0 else 1.0


def pooled(work: Work) -> Work:
    """The same work as the stage's pooled entry (``<stage>._all``) counts it: every class
    of the stage together, units scaled by the preset's prior cost, so a class never seen
    (a new codec) starts from what the stage has measured rather than from the prior."""
    return Work(stage=work.stage, cls=POOL, units=round(work.units * _preset_scale(work), 6))


def coefficients(work: Work, entry: CostEntry | None,
                 pool: CostEntry | None = None) -> Coefficients:
    """The coefficients to predict ``work`` with: fitted from its class's entry, starting
    from the stage's pooled fit (or the prior, while the stage has measured nothing)."""
    start = prior(work)
    if pool is not None and pool.samples and work.cls != POOL:
        stage = fit(pool.samples, prior(pooled(work)))
        start = Coefficients(overhead_s=stage.overhead_s,
                             rate_s=stage.rate_s * _preset_scale(work))
    return fit(entry.samples if entry is not None else [], start)


def predict(work: Work, entry: CostEntry | None, pool: CostEntry | None = None) -> float:
    """Predicted compute-seconds of ``work``, given its (stage, class) entry and the stage's
    pooled entry (None: nothing measured)."""
    return round(coefficients(work, entry, pool).seconds(work.units), 3)


def observe(entry: CostEntry | None, work: Work, seconds: float,
            sample_id: str = "", pool: CostEntry | None = None) -> CostEntry:
    """A new entry with one measured step added (and the error its prediction, with
    ``pool`` as the stage's pooled entry, had); the entry as it was when ``sample_id`` is
    one it has already counted."""
    entry = entry or CostEntry()
    if sample_id and sample_id in entry.seen:
        return entry
    predicted = predict(work, entry, pool)
    errors = list(entry.errors)
    if seconds > 0:
        errors = [*errors, round(abs(predicted - seconds) / seconds, 4)][-MAX_ERRORS:]
    return CostEntry(samples=[*entry.samples, (work.units, round(seconds, 4))][-MAX_SAMPLES:],
                     errors=errors, count=entry.count + 1,
                     seen=[*entry.seen, sample_id][-MAX_SAMPLES:] if sample_id else entry.seen)


def timeout_for(predicted_s: float, factor: float, minimum: float, maximum: float) -> float:
    """A step's deadline from its prediction: ``factor`` times it, within the bounds."""
    return min(maximum, max(minimum, predicted_s * factor))


def job_probe(record: JobRecord) -> MediaInfo | None:
    """The job's probe result, once its probe step is done (what every prediction needs)."""
    for step in record.steps.values():
        if step.stage == "probe" and step.status == StepStatus.DONE and step.meta:
            try:
                return msgspec.convert(step.meta, MediaInfo)
            except msgspec.ValidationError:
                return None
    return None


def step_work(record: JobRecord, step_name: str, part: int | None,
              info: MediaInfo | None) -> Work:
    """The work of one task of a job (a step, or one part of an expanded step)."""
    step = record.steps[step_name]
    count = len(step.parts)
    sizes = [record.inputs[i].size for ref in step.uses
             if (i := input_ref_index(ref)) is not None and i < len(record.inputs)]
    input_mb = sum(s or 0 for s in sizes) / 1e6 if sizes and None not in sizes else None
    return work_of(step.stage, step.params, info,
                   (part, count) if part is not None and count else None, input_mb)


def remaining_s(record: JobRecord, seconds: Callable[[Work], float], now: float) -> float:
    """Predicted wall-clock seconds until the job is finished: the longest chain of steps
    through its DAG, each step's remaining compute-seconds (parts one after another, a
    running task less the time it has already run). An upper bound where several workers
    take one step's parts at once.

    Args:
        record: the job.
        seconds: predicted compute-seconds of one task's work (``predict`` with entries).
        now: the wall clock (``time.time()``), for running tasks.
    """
    if record.status not in ACTIVE_JOB:
        return 0.0
    info = job_probe(record)

    def left(name: str) -> float:
        step = record.steps[name]
        if step.status in FINISHED_STEP or step.status in (StepStatus.FAILED,
                                                            StepStatus.CANCELLED):
            return 0.0
        if step.each is not None and step.parts:
            return sum(_unit_left(p.status, p.started_at, seconds(
                step_work(record, name, i, info)), now) for i, p in enumerate(step.parts))
        return _unit_left(step.status, step.started_at,
                          seconds(step_work(record, name, None, info)), now)

    finish: dict[str, float] = {}

    def finish_of(name: str, depth: int = 0) -> float:
        if name not in finish:
            deps = [d for d in record.steps[name].step_deps if d in record.steps]
            before = max((finish_of(d, depth + 1) for d in deps), default=0.0) \
                if depth < len(record.steps) else 0.0
            finish[name] = before + left(name)
        return finish[name]

    return round(max((finish_of(n) for n in record.steps), default=0.0), 1)


def _unit_left(status: StepStatus, started_at: float | None, predicted: float,
               now: float) -> float:
    if status in FINISHED_STEP or status in (StepStatus.FAILED, StepStatus.CANCELLED):
        return 0.0
    if status == StepStatus.RUNNING and started_at is not None:
        return max(0.0, predicted - (now - started_at))
    return predicted


def remaining_compute_s(record: JobRecord, seconds: Callable[[Work], float],
                        now: float) -> float:
    """Predicted compute-seconds the job still needs, all its tasks together (what it will
    take from the workers, however many): the measure of a tenant's backlog."""
    if record.status not in ACTIVE_JOB:
        return 0.0
    info = job_probe(record)
    total = 0.0
    for name, step in record.steps.items():
        units = [(i, p.status, p.started_at) for i, p in enumerate(step.parts)] \
            if step.each is not None and step.parts else [(None, step.status, step.started_at)]
        for part, status, started_at in units:
            total += _unit_left(status, started_at,
                                seconds(step_work(record, name, part, info)), now)
    return round(total, 1)
