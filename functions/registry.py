"""Every deployable function, by name: what ``jetcut run <name>`` and ``jetcut dev`` serve."""

from __future__ import annotations

from functions import conductor, gateway, noop, probe, thumbnail, transcode
from shared.function import Function

FUNCTIONS: dict[str, Function] = {
    fn.name: fn
    for fn in (
        gateway.function,
        conductor.function,
        probe.function,
        transcode.function,
        thumbnail.function,
        noop.function,
    )
}
