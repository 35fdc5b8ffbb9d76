"""Triage: dead letters grouped by what went wrong, and a whole group replayed at once.

One bug dead-letters many jobs, each entry with its own job id, task id, path and numbers in
its message. An operator wants the bug, not the entries: a *group* is every entry with the
same function (the stage, for a stage task), the same error code and the same *shape* of
message -- the message with ids, numbers, paths, hex and quoted values replaced by
placeholders (``shape``), so "job jabc...: no such file /tmp/x/1.mp4" and "job jxyz...: no
such file /tmp/y/2.mp4" are one group while "permission denied" is another.

A group id is ``<function>.<code>.<fingerprint>`` (the fingerprint: 12 hex digits of the
SHA-256 of function, code and shape), readable in a listing and stable across processes and
releases of the same shape rules. Groups are computed on demand from the DLQ stream (one
pass over its entries): nothing is stored besides the entries themselves, so a group can
never disagree with them.

Replaying a group replays each of its entries through ``shared.dlq.replay`` (so each under
``replay:<seq>``, once, and removed from the DLQ afterwards), except that the stage tasks of
one job are one retry of that job: the first entry retries it, the others are removed as
covered by it. A repeat finds the replayed entries gone: only entries dead-lettered since
(the same bug striking again) are replayed by it.
"""

from __future__ import annotations

import hashlib
import re
from typing import Literal

import msgspec

from shared import dlq
from shared.errors import ErrorCode, JetcutError, MalformedRequest
from shared.function import Services

GROUP_ID = re.compile(r"^(?P<function>[A-Za-z0-9_-]{1,64})\.(?P<code>[a-z0-9_]{1,64})"
                      r"\.(?P<fingerprint>[0-9a-f]{12})$")
"""What ``group_id`` makes; the gateway and CLI check a group id against it first."""

SHAPE_CHARS = 300
"""A shape is cut here: two messages that differ only after it are one group."""

# Order matters: a path or a quoted value is replaced whole before its digits would be.
_SHAPE_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    # Quoted values (keys, file names, ids); msgspec's `backticked` type and field names
    # are the shape itself and stay.
    (re.compile(r"'[^']*'|\"[^\"]*\""), "<q>"),
    (re.compile(r"[A-Za-z]+://\S+"), "<url>"),
    (re.compile(r"(?:[A-Za-z0-9_.-]*/)+[A-Za-z0-9_.-]+/?"), "<path>"),
    (re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.I),
     "<uuid>"),
    (re.compile(r"\b[jut][a-z2-7]{26}\b"), "<id>"),  # shared.ids: job, upload, task ids
    (re.compile(r"\b0x[0-9a-f]+\b", re.I), "<hex>"),
    (re.compile(r"\b(?=[0-9a-f]*[0-9])[0-9a-f]{8,}\b", re.I), "<hex>"),
    (re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?", re.I), "<n>"),
    (re.compile(r"\s+"), " "),
)


class GroupNotFound(JetcutError):
    """No entry in the DLQ belongs to that group (never did, replayed, purged or expired)."""

    code = ErrorCode.NOT_FOUND
    non_retryable = True

    def __init__(self, group: str) -> None:
        super().__init__(f"no DLQ group {group!r} (replayed, purged, expired, or never "
                         "dead-lettered)", details={"group": group})


class BadGroupId(MalformedRequest):
    """Not a group id at all (``<function>.<code>.<12 hex digits>``): HTTP 400."""

    def __init__(self, group: str) -> None:
        super().__init__(f"{group!r} is not a DLQ group id: <function>.<error code>."
                         "<12 hex digits>, as GET /v1/dlq/groups lists them",
                         details={"group": group[:200]})


class Group(msgspec.Struct, kw_only=True):
    """Every DLQ entry one cause produced."""

    group: str
    """``<function>.<code>.<fingerprint>``: pass it to ``:replay``."""
    function: str
    """The function that dead-lettered the entries (for a stage task, its stage)."""
    code: str
    fingerprint: str
    shape: str
    """The error message with ids, numbers, paths and quoted values as placeholders."""
    count: int
    jobs: int
    """Distinct jobs among the entries (0 when no payload names a job)."""
    first_seen: float
    last_seen: float
    example: dlq.Summary
    """The newest entry of the group."""


class GroupList(msgspec.Struct, kw_only=True):
    groups: list[Group]
    """Largest group first (then the most recently seen)."""
    entries: int
    """Entries read to make the groups (every entry in the DLQ)."""


class GroupReplayItem(msgspec.Struct, kw_only=True):
    seq: int
    outcome: Literal["replayed", "covered", "conflict", "gone"]
    """``replayed``: acted on and removed. ``covered``: another entry of the same job
    retried it in this replay; removed. ``conflict``: its job is not failed or cancelled;
    kept. ``gone``: removed meanwhile (another replay or purge got there first)."""
    job_id: str | None = None
    message: str = ""


class GroupReplayResult(msgspec.Struct, kw_only=True):
    group: str
    replayed: int
    """Entries acted on (each once) and removed from the DLQ."""
    covered: int
    kept: int
    """Entries left in the DLQ (``conflict``): see each item's message."""
    items: list[GroupReplayItem]


def shape(message: str) -> str:
    """The message with what differs between occurrences of one cause made uniform."""
    for pattern, placeholder in _SHAPE_RULES:
        message = pattern.sub(placeholder, message)
    return message.strip()[:SHAPE_CHARS]


def _code_token(code: str) -> str:
    token = re.sub(r"[^a-z0-9_]", "_", code.lower())[:64]
    return token or "unknown"


def group_id(function: str, code: str, message: str) -> str:
    """The group a dead letter belongs to (see the module docstring)."""
    token = function if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", function) else "unknown"
    digest = hashlib.sha256(f"{function}\x00{code}\x00{shape(message)}".encode()).hexdigest()
    return f"{token}.{_code_token(code)}.{digest[:12]}"


def check_group_id(value: str) -> str:
    """``value`` when it is shaped like a group id.

    Raises:
        BadGroupId: it is not.
    """
    if not GROUP_ID.fullmatch(value):
        raise BadGroupId(value)
    return value


def _of(summary: dlq.Summary) -> str:
    return group_id(summary.function, summary.error.code, summary.error.message)


async def list_groups(services: Services) -> GroupList:
    """Every group in the DLQ now, largest first.

    One streamed pass over the DLQ (``shared.dlq.scan``): fine for the thousands of
    entries a DLQ holds between triages; the stream's 30-day age limit bounds it.
    """
    entries = await dlq.scan(services)
    members: dict[str, list[dlq.Summary]] = {}
    for entry in entries:
        members.setdefault(_of(entry), []).append(entry)
    groups = []
    for gid, items in members.items():
        newest = max(items, key=lambda e: (e.at, e.seq))
        groups.append(Group(
            group=gid, function=newest.function, code=newest.error.code,
            fingerprint=gid.rsplit(".", 1)[1], shape=shape(newest.error.message),
            count=len(items), jobs=len({e.job_id for e in items if e.job_id}),
            first_seen=min(e.at for e in items), last_seen=newest.at, example=newest,
        ))
    groups.sort(key=lambda g: (-g.count, -g.last_seen, g.group))
    return GroupList(groups=groups, entries=len(entries))


async def members_of(services: Services, group: str) -> list[dlq.Summary]:
    """The entries of ``group``, oldest first.

    Raises:
        BadGroupId: ``group`` is not shaped like a group id.
        GroupNotFound: no entry belongs to it.
    """
    check_group_id(group)
    function = GROUP_ID.fullmatch(group)["function"]  # type: ignore[index]
    found = [e for e in await dlq.scan(services, function=function) if _of(e) == group]
    if not found:
        raise GroupNotFound(group)
    return found


async def replay_group(services: Services, group: str) -> GroupReplayResult:
    """Replay every entry of ``group`` once (see the module docstring).

    Raises:
        BadGroupId: ``group`` is not shaped like a group id.
        GroupNotFound: no entry belongs to it (a repeat of a finished replay).
        TransientError: the bus did not acknowledge a replay; entries replayed before it
            are gone from the DLQ, the rest are kept, so repeating the call finishes the job.
    """
    items: list[GroupReplayItem] = []
    retried: set[str] = set()
    for entry in await members_of(services, group):
        if entry.job_id in retried and entry.subject.startswith("stages."):
            await dlq.remove_original(services, services.names.dlq_stream, entry.seq)
            items.append(GroupReplayItem(seq=entry.seq, outcome="covered", job_id=entry.job_id,
                                         message=f"job {entry.job_id} is retried by this "
                                                 "replay already"))
            continue
        try:
            result = await dlq.replay(services, entry.seq)
        except dlq.EntryNotFound:
            items.append(GroupReplayItem(seq=entry.seq, outcome="gone", job_id=entry.job_id))
            continue
        except dlq.ReplayConflict as exc:
            items.append(GroupReplayItem(seq=entry.seq, outcome="conflict",
                                         job_id=entry.job_id, message=exc.message))
            continue
        if result.action == "job_retry" and result.job_id is not None:
            retried.add(result.job_id)
        items.append(GroupReplayItem(seq=entry.seq, outcome="replayed", job_id=result.job_id,
                                     message=result.message))
    return GroupReplayResult(
        group=group, items=items,
        replayed=sum(i.outcome == "replayed" for i in items),
        covered=sum(i.outcome == "covered" for i in items),
        kept=sum(i.outcome == "conflict" for i in items),
    )

