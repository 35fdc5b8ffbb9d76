"""Ids jetcut mints. Object keys and subjects are built only from these, never user text."""

from __future__ import annotations

import base64
import hashlib
import os
import time


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode().rstrip("=").lower()


def new_id(prefix: str) -> str:
    """Time-ordered, unguessable: 6 bytes of milliseconds + 10 random bytes, base32."""
    ms = int(time.time() * 1000).to_bytes(6, "big")
    return prefix + _b32(ms + os.urandom(10))


def job_id_for(tenant: str, idempotency_key: str) -> str:
    """The same (tenant, key) always names the same job: repeats can never make two."""
    digest = hashlib.sha256(f"{tenant}\x00{idempotency_key}".encode()).digest()
    return "j" + _b32(digest[:16])


def new_job_id() -> str:
    return new_id("j")


def new_upload_id() -> str:
    return new_id("u")
