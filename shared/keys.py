"""API keys: minted once, stored only as a hash, each mapped to one tenant.

A key reads ``jc_<key_id>_<secret>``. The id is public (it names the key in ``jetcut keys
list`` and in logs) and is the KV key of its record, so a lookup is one read; the secret is
256 random bits and never stored. The record keeps SHA-256 of the whole key: with that much
entropy a slow password hash buys nothing (no dictionary to try), and comparing digests
with ``hmac.compare_digest`` keeps the check constant-time.

Records live in the KV bucket ``keys`` (``<namespace>_keys``). The gateway reads them on
every request, so a revocation takes effect at once; operators manage them with
``jetcut keys create|list|revoke``, which talks to NATS directly.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time

import msgspec
from nats.js import JetStreamContext, api
from nats.js.errors import (
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoKeysError,
)
from nats.js.kv import KeyValue

from shared.retry import ride_out
from shared.settings import Settings
from shared.subjects import Names, check_token

PREFIX = "jc_"
ID_LEN = 16
ID_RE = re.compile(rf"^[a-z2-7]{{{ID_LEN}}}$")
KEY_RE = re.compile(rf"^{PREFIX}([a-z2-7]{{{ID_LEN}}})_([A-Za-z0-9_-]{{43}})$")
ADMIN = "admin"
SCOPES = frozenset({ADMIN})


class KeyRecord(msgspec.Struct, kw_only=True):
    """What is stored for one key: never the key itself."""

    key_id: str
    tenant: str
    sha256: str
    name: str = ""
    scopes: list[str] = []
    created_at: float
    revoked_at: float | None = None

    @property
    def admin(self) -> bool:
        return ADMIN in self.scopes

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(KeyRecord)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse(key: str) -> str | None:
    """The key id of a well-formed key, or None (so garbage never reaches the store)."""
    match = KEY_RE.match(key)
    return match.group(1) if match else None


def mint() -> tuple[str, str]:
    """A new (key_id, key)."""
    key_id = base64.b32encode(secrets.token_bytes(10)).decode().lower()
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    return key_id, f"{PREFIX}{key_id}_{secret}"


class KeyStore:
    """The ``keys`` bucket: create, look up, list and revoke API keys."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext, names: Names, settings: Settings) -> KeyStore:
        """Open the bucket, creating it (as the jobs bucket is) the first time."""
        try:
            kv = await js.key_value(names.keys_bucket)
        except BucketNotFoundError:
            kv = await js.create_key_value(api.KeyValueConfig(
                bucket=names.keys_bucket, history=5, storage=api.StorageType.FILE,
                replicas=settings.replicas, description="jetcut API keys (hashed)",
            ))
        return cls(kv)

    async def create(self, tenant: str, *, name: str = "", admin: bool = False
                     ) -> tuple[str, KeyRecord]:
        """Mint a key for ``tenant``; the key is returned here and never again.

        Raises:
            ValueError: the tenant is not a safe token.
        """
        check_token("tenant", tenant)
        key_id, key = mint()
        record = KeyRecord(key_id=key_id, tenant=tenant, sha256=digest(key), name=name[:200],
                           scopes=[ADMIN] if admin else [], created_at=time.time())
        await ride_out(lambda: self.kv.create(key_id, _encoder.encode(record)))
        return key, record

    async def get(self, key_id: str) -> KeyRecord | None:
        try:
            entry = await ride_out(lambda: self.kv.get(key_id))
        except KeyNotFoundError:
            return None
        return _decoder.decode(entry.value) if entry.value else None

    async def verify(self, key: str) -> KeyRecord | None:
        """The record of a valid, unrevoked key; None for anything else."""
        key_id = parse(key)
        if key_id is None:
            return None
        record = await self.get(key_id)
        if record is None or record.revoked:
            return None
        return record if hmac.compare_digest(record.sha256, digest(key)) else None

    async def list(self) -> list[KeyRecord]:
        try:
            ids = await self.kv.keys()
        except NoKeysError:
            return []
        found = [await self.get(key_id) for key_id in ids]
        return sorted((r for r in found if r is not None), key=lambda r: r.created_at)

    async def revoke(self, key_id: str) -> KeyRecord | None:
        """Mark a key revoked (kept, so ``list`` shows when); None if there is no such key."""
        if not ID_RE.match(key_id):
            return None
        while True:
            try:
                entry = await ride_out(lambda: self.kv.get(key_id))
            except KeyNotFoundError:
                return None
            if not entry.value or entry.revision is None:
                return None
            record = _decoder.decode(entry.value)
            if record.revoked:
                return record
            record.revoked_at = time.time()
            try:
                await self.kv.update(key_id, _encoder.encode(record), last=entry.revision)
            except KeyWrongLastSequenceError:
                continue  # changed since read (another revoke): read again
            return record
