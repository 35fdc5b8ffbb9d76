"""A progressive HLS job's stream as its job record describes it: playable while it runs.

In a progressive ``hls`` job (``shared.params.hls``) every ``encode-part`` task also writes
its part as an MPEG-TS segment (output ``segment``) on the whole video's timeline, and the
split's meta has every part's length. So the record alone says which segments of which rung
exist, and the playlists are *derived*, never stored: a media playlist lists a rung's
finished parts from part 0 up to the first one not finished (it only ever grows at its
end), typed ``EVENT`` while the job runs and ``VOD`` once it succeeded, with
``#EXT-X-ENDLIST`` once the rung has every part. The master playlist lists the first rung
(the fast one, planned first) as soon as its part 0 exists, and every other rung once it is
complete (a player that switched to a rung behind the playhead would stall).

Pure functions (no I/O): the gateway serves what they return (``functions/gateway/
playback.py``) and the conductor announces the moment the job became playable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shared.jobstate import JobRecord, JobStatus, StepState, StepStatus
from shared.params.hls import default_maxrate_k, rung_name

SEGMENT_OUTPUT = "segment"
"""The logical name of an encoded part's playable segment."""


@dataclass(frozen=True)
class Rung:
    """One rung of a progressive ladder, as far as the record knows it."""

    name: str
    """``360p``: the media playlist is ``<name>.m3u8``."""
    step: str
    """The ``encode-part`` step that writes its segments."""
    durations: tuple[float, ...]
    """Every part's length in seconds (from the split), whether encoded yet or not."""
    ready: int
    """Parts finished from part 0 on, without a gap: what the playlist lists."""
    keys: tuple[str, ...]
    """Store keys of the ``ready`` segments, in order."""
    width: int | None
    height: int | None
    bandwidth: int
    """Peak bits per second the player should budget (the rung's VBV cap plus audio)."""

    @property
    def complete(self) -> bool:
        return self.ready == len(self.durations)

    @property
    def target_s(self) -> int:
        """``#EXT-X-TARGETDURATION``: fixed from the first listing on (the split is done)."""
        return max(1, math.ceil(max(self.durations, default=1.0) - 1e-6))


def _is_progressive(step: StepState) -> bool:
    return step.stage == "encode-part" and bool(step.params.get("segment")) and bool(
        step.each)


def rungs(record: JobRecord) -> list[Rung]:
    """The progressive rungs in plan order (the first is the fast one), skipped ones left
    out; empty for a job that is not a progressive ladder (or not split yet)."""
    found = []
    for name, step in record.steps.items():
        if not _is_progressive(step) or step.status == StepStatus.SKIPPED:
            continue
        split = record.steps.get(step.each or "")
        durations = (split.meta.get("durations") if split else None) or []
        if not step.parts or len(durations) != len(step.parts):
            continue
        keys = []
        for part in step.parts:
            key = part.outputs.get(SEGMENT_OUTPUT)
            if part.status != StepStatus.DONE or key is None:
                break
            keys.append(key)
        height = int(step.params.get("height") or 0)
        rendition = next((record.steps[u].meta for u in step.uses
                          if u in record.steps and record.steps[u].stage == "rendition"), {})
        audio_k = int(step.params.get("audio_bitrate_k") or 128)
        video_k = int(step.params.get("maxrate_k") or default_maxrate_k(height))
        found.append(Rung(name=rung_name(height), step=name,
                          durations=tuple(float(d) for d in durations), ready=len(keys),
                          keys=tuple(keys), width=rendition.get("width"),
                          height=rendition.get("height"),
                          bandwidth=(video_k + audio_k) * 1000))
    return found


def first_step(record: JobRecord) -> str | None:
    """The ``encode-part`` step of the first (fast) rung, if the job is progressive."""
    return next((name for name, step in record.steps.items()
                 if _is_progressive(step) and step.status != StepStatus.SKIPPED), None)


def playable_at(record: JobRecord) -> float | None:
    """When the job's stream became playable: part 0 of its first rung finished. (The
    part's outputs may be gone since, a succeeded job's intermediates being cleaned up:
    the moment stays.)"""
    name = first_step(record)
    parts = record.steps[name].parts if name else []
    if parts and parts[0].status == StepStatus.DONE:
        return parts[0].finished_at or record.updated_at
    return None


def listed(record: JobRecord) -> list[Rung]:
    """The rungs the master playlist names now (see the module docstring)."""
    found = rungs(record)
    if not found or not found[0].ready:
        return []
    return [found[0], *(r for r in found[1:] if r.complete)]


def master_playlist(record: JobRecord) -> str | None:
    """The master playlist, highest rung first; None while nothing is playable."""
    names = listed(record)
    if not names:
        return None
    lines = ["#EXTM3U", "#EXT-X-VERSION:3", "#EXT-X-INDEPENDENT-SEGMENTS"]
    for rung in sorted(names, key=lambda r: (-(r.height or 0), -r.bandwidth)):
        attrs = [f"BANDWIDTH={rung.bandwidth}"]
        if rung.width and rung.height:
            attrs.append(f"RESOLUTION={rung.width}x{rung.height}")
        lines += ["#EXT-X-STREAM-INF:" + ",".join(attrs), f"{rung.name}.m3u8"]
    return "\n".join(lines) + "\n"


def media_playlist(record: JobRecord, rung: Rung) -> str:
    """The rung's media playlist now: segments ``<rung>/<i>.ts``, relative to it."""
    kind = "VOD" if record.status == JobStatus.SUCCEEDED else "EVENT"
    lines = ["#EXTM3U", "#EXT-X-VERSION:3", f"#EXT-X-TARGETDURATION:{rung.target_s}",
             "#EXT-X-MEDIA-SEQUENCE:0", f"#EXT-X-PLAYLIST-TYPE:{kind}",
             "#EXT-X-INDEPENDENT-SEGMENTS"]
    for i in range(rung.ready):
        lines += [f"#EXTINF:{rung.durations[i]:.6f},", f"{rung.name}/{i}.ts"]
    if rung.complete:
        lines.append("#EXT-X-ENDLIST")
    return "\n".join(lines) + "\n"


def playback_url(record: JobRecord, base: str) -> str | None:
    """Where a player starts: the progressive master playlist once the job is playable,
    the packaged VOD's once the job has succeeded; None otherwise (not playable yet, not a
    progressive ladder, or failed / cancelled)."""
    vod = packaged_master(record)
    if record.status == JobStatus.SUCCEEDED and vod is not None:
        return f"{base}/v1/jobs/{record.job_id}/outputs/{vod[0]}/{vod[1]}"
    if record.terminal or playable_at(record) is None:
        return None
    return f"{base}/v1/jobs/{record.job_id}/play/master.m3u8"


def packaged_master(record: JobRecord) -> tuple[str, str] | None:
    """(step, output) of a done ``package-hls`` step's master playlist."""
    for name, step in record.steps.items():
        if step.stage == "package-hls" and step.status == StepStatus.DONE:
            master = str(step.meta.get("master") or "master.m3u8")
            if master in step.outputs:
                return name, master
    return None
