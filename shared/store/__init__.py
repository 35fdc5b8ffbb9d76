"""Object store: where every byte of media and every checkpoint lives.

Two backends share one interface and one contract test suite: :class:`S3Store` (MinIO,
AWS S3, any S3 API) and :class:`LocalStore` (a directory; the embedded default). Code takes
an :class:`ObjectStore` and never knows which one it has.
"""

from __future__ import annotations

from shared.settings import Settings
from shared.store.base import ObjectInfo, ObjectStore, validate_key, validate_prefix
from shared.store.local import LocalStore
from shared.store.s3 import S3Store

__all__ = [
    "LocalStore",
    "ObjectInfo",
    "ObjectStore",
    "S3Store",
    "open_store",
    "validate_key",
    "validate_prefix",
]


def open_store(settings: Settings) -> ObjectStore:
    """Build the store ``settings.store`` names; the caller runs ``ensure_ready()`` and
    owns ``close()``. No I/O happens here, so wiring a process never blocks on it."""
    if settings.store == "local":
        return LocalStore(settings.store_root)
    if settings.store == "s3":
        return S3Store(
            settings.s3_endpoint,
            settings.s3_access_key,
            settings.s3_secret_key,
            settings.bucket,
            secure=settings.s3_secure,
            region=settings.s3_region,
            public_endpoint=settings.s3_public_endpoint,
        )
    raise ValueError(f"unknown store backend {settings.store!r}")
