"""The job request a person or a program writes: ``POST /v1/jobs``'s body, an item of a
batch, and the data of an ``io.jetcut.job.request`` CloudEvent. One struct, so every way in
accepts the same fields and refuses the same mistakes.

User input: unknown fields are refused, not ignored.
"""

from __future__ import annotations

from typing import Any

import msgspec

from shared.events import StepSpec


class JobRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A recipe (or inline steps), the inputs it works on, and where to report."""

    recipe: str | None = None
    steps: dict[str, StepSpec] | None = None
    input: str | None = None
    """An upload id (``u...``), a store key under ``uploads/<tenant>/``, or (ingest) a key
    under the ingest prefix."""
    inputs: list[str] = []
    params: dict[str, Any] = {}
    callback_url: str | None = None
    """http(s) URL that gets the job's signed status changes (see docs/api.md, Callbacks)."""
    callback_secret: str | None = None
    """HMAC key for those callbacks, 16-256 chars (default: JETCUT_CALLBACK_SECRET)."""

    @property
    def refs(self) -> list[str]:
        """Every input, in order: ``input`` first, then ``inputs``."""
        return ([self.input] if self.input else []) + list(self.inputs)
