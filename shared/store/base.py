"""The object store interface every backend implements, and the key rules they share.

Stage functions keep every byte of media and every checkpoint in an object store, so the
rest of the system codes against :class:`ObjectStore` only. Keys are validated here, once,
for every backend: a key that passes is safe to use as a relative file path and as an S3
object name, so code that runs on the local store in development runs unchanged on S3.
"""

from __future__ import annotations

import abc
import contextlib
import os
import tempfile
import unicodedata
from collections.abc import AsyncGenerator, Iterable
from types import TracebackType

import msgspec

from shared.errors import InvalidKey, NotSupported, ObjectNotFound

MAX_KEY_BYTES = 1024
"""S3's limit on an object name, in UTF-8 bytes."""

DEFAULT_CONTENT_TYPE = "application/octet-stream"
"""What S3 records when a writer names no content type; the local store matches it."""

DEFAULT_CHUNK_SIZE = 1 << 20


class ObjectInfo(msgspec.Struct, frozen=True):
    """What a store knows about one object.

    Attributes:
        key: the object's key.
        size: length in bytes.
        etag: opaque content tag; changes when the content changes (hex MD5 for single-part
            writes, S3's ``<md5>-<parts>`` form for multipart uploads).
        last_modified: when the object was last written, in unix seconds.
        content_type: the MIME type recorded at write time; ``None`` where the backend does
            not report it (S3 listings).
    """

    key: str
    size: int
    etag: str
    last_modified: float
    content_type: str | None = None


def validate_key(key: str) -> str:
    """Check that ``key`` is a safe, canonical object key and return it.

    A key is non-empty, relative, '/'-separated, at most 1024 UTF-8 bytes, and has no
    empty, '.' or '..' segment, backslash or control character. These rules are what lets
    the local backend map a key to a path under its root without escaping it, and what keeps
    one object from having two spellings.

    Raises:
        InvalidKey: naming the rule the key broke.
    """
    reason = _key_problem(key)
    if reason is not None:
        raise InvalidKey(key if isinstance(key, str) else repr(key), reason)
    return key


def validate_prefix(prefix: str) -> str:
    """Check a listing/deletion prefix: a valid key, optionally ending in one '/'.

    Prefixes are plain string prefixes, as in S3: ``jobs/1`` matches ``jobs/1/a`` and
    ``jobs/10/a``; end the prefix with '/' to select one "directory". An empty prefix is
    refused so that ``delete_prefix`` can never wipe a whole bucket by mistake.

    Raises:
        InvalidKey: naming the rule the prefix broke.
    """
    body = prefix[:-1] if isinstance(prefix, str) and prefix.endswith("/") else prefix
    reason = _key_problem(body)
    if reason is not None:
        raise InvalidKey(prefix if isinstance(prefix, str) else repr(prefix), reason)
    return prefix


def _key_problem(key: object) -> str | None:
    if not isinstance(key, str):
        return "not a string"
    if not key:
        return "empty"
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        return "not valid UTF-8"
    if size > MAX_KEY_BYTES:
        return f"longer than {MAX_KEY_BYTES} bytes"
    if key.startswith("/"):
        return "absolute (starts with '/')"
    if "\\" in key:
        return "contains a backslash"
    # Category Cc covers C0 controls (NUL included), DEL and C1 controls.
    if any(unicodedata.category(ch) == "Cc" for ch in key):
        return "contains a control character"
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            return f"has a {segment!r} segment" if segment else "has an empty segment"
    return None


def write_atomically(path: str | os.PathLike[str], chunks: Iterable[bytes]) -> int:
    """Write ``chunks`` to ``path`` through a temp file in the same directory, then rename.

    Both backends' ``get_file`` use it, so a crashed or cancelled download never leaves a
    truncated file where a later step (or a resumed one) would take it for a whole input.
    Parent directories are created. Blocking: call it from a worker thread.

    Returns:
        The number of bytes written.
    """
    target = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    # Keep the temp name under NAME_MAX even for a long target name.
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{name[:100]}.", suffix=".part")
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
                size += len(chunk)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return size


class ObjectStore(abc.ABC):
    """An object store: MinIO / any S3 API, or a local directory.

    Every method validates its key (or prefix) with :func:`validate_key`
    (:func:`validate_prefix`) and raises :class:`~shared.errors.InvalidKey` before touching
    the backend. Reads of a missing key raise :class:`~shared.errors.ObjectNotFound`
    (non-retryable); an unreachable or failing backend raises
    :class:`~shared.errors.StoreUnavailable` (transient, so the step is retried).
    Writes are atomic: a reader sees the old object or the new one, never a part.
    """

    @abc.abstractmethod
    async def ensure_ready(self) -> None:
        """Create the bucket or root directory if missing; safe to call any number of times."""

    @abc.abstractmethod
    async def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> ObjectInfo:
        """Write ``data`` under ``key``, replacing any previous object."""

    @abc.abstractmethod
    async def put_file(
        self, key: str, path: str | os.PathLike[str], content_type: str | None = None
    ) -> ObjectInfo:
        """Upload a local file under ``key``, streaming it: memory stays bounded by the
        backend's part/chunk size whatever the file's size (renditions can be gigabytes)."""

    @abc.abstractmethod
    async def get_bytes(self, key: str) -> bytes:
        """Read a whole object into memory; for small objects such as manifests."""

    @abc.abstractmethod
    async def get_file(self, key: str, path: str | os.PathLike[str]) -> ObjectInfo:
        """Download an object to ``path`` (parents created) through a temp file in the same
        directory renamed into place, so ``path`` never holds a partial download."""

    @abc.abstractmethod
    def iter_chunks(
        self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> AsyncGenerator[bytes, None]:
        """Stream an object in chunks of at most ``chunk_size`` bytes, in constant memory.

        The key is validated when this is called; a missing object raises
        :class:`~shared.errors.ObjectNotFound` on the first iteration. An async generator
        (an ``AsyncIterator`` with ``aclose``): wrap it in ``contextlib.aclosing`` when you
        may stop early, so the connection or file is released at once rather than at
        garbage collection.
        """

    @abc.abstractmethod
    async def stat(self, key: str) -> ObjectInfo:
        """Describe an object without reading it."""

    async def exists(self, key: str) -> bool:
        """Whether an object exists under ``key``; used to test for a step's manifest."""
        try:
            await self.stat(key)
        except ObjectNotFound:
            return False
        return True

    @abc.abstractmethod
    async def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix``, recursively, sorted by key."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove an object; a missing key is not an error, so retries are harmless."""

    @abc.abstractmethod
    async def delete_prefix(self, prefix: str) -> int:
        """Remove every object under ``prefix`` (as :meth:`list` selects them).

        Returns:
            The number of objects deleted.
        """

    async def presign_put(self, key: str, expires_s: float) -> str:
        """A URL that lets its holder PUT the object ``key`` directly, for ``expires_s``
        seconds, so large uploads need not pass through the gateway.

        Raises:
            NotSupported: the backend has no such URLs (the local store).
        """
        validate_key(key)
        raise NotSupported(f"{type(self).__name__} cannot presign uploads; upload through "
                           "the gateway (POST /v1/uploads)")

    async def presign_get(self, key: str, expires_s: float, filename: str | None = None) -> str:
        """A URL that lets its holder GET the object ``key`` for ``expires_s`` seconds (as an
        attachment named ``filename`` when given).

        Raises:
            NotSupported: the backend has no such URLs (the local store).
        """
        validate_key(key)
        raise NotSupported(f"{type(self).__name__} cannot presign downloads; download "
                           "through the gateway")

    @abc.abstractmethod
    async def check(self) -> None:
        """Cheap health probe for readiness checks.

        Raises:
            StoreUnavailable: the backend cannot serve requests.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections; the store is unusable afterwards."""

    async def __aenter__(self) -> ObjectStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
