"""S3 object store on the ``minio`` client: MinIO, AWS S3, or any S3 API.

The minio client is synchronous, so every call runs in a worker thread
(``asyncio.to_thread``) and the event loop never blocks on the network. The client gets its
own urllib3 pool with short connect timeouts and a few retries, so an unreachable endpoint
surfaces within seconds as :class:`~shared.errors.StoreUnavailable` (transient: the step is
retried later) instead of hanging a worker for minutes on minio's defaults.

Memory stays bounded on large objects: uploads go through ``put_object`` with the open file,
which reads one multipart part at a time (``part_size`` x (``parallel_uploads`` + 1) bytes
at most in flight); downloads read the response stream chunk by chunk.
"""

from __future__ import annotations

import asyncio
import builtins
import io
import os
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from datetime import datetime, timedelta
from typing import BinaryIO, ParamSpec, TypeVar

import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from minio.time import from_http_header
from urllib3.response import BaseHTTPResponse

from shared.errors import ObjectNotFound, StoreUnavailable
from shared.store.base import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_CONTENT_TYPE,
    ObjectInfo,
    ObjectStore,
    validate_key,
    validate_prefix,
    write_atomically,
)

P = ParamSpec("P")
T = TypeVar("T")

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchObject", "NotFound"})
_BUCKET_MINE_CODES = frozenset({"BucketAlreadyOwnedByYou"})
# Network-level failures as urllib3 reports them (connection refused, reset, timeouts,
# retries exhausted on 5xx), plus the builtin ones that can slip past it.
_NETWORK_ERRORS = (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)


class _CallerIOError(Exception):
    """Carries an OSError on the caller's own file out of the worker thread unchanged."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class S3Store(ObjectStore):
    """Objects in one S3 bucket.

    Args:
        endpoint: ``host:port`` of the S3 API (no scheme).
        access_key: access key id.
        secret_key: secret access key.
        bucket: the bucket holding every object of this store.
        secure: use HTTPS.
        region: the bucket's region; giving it saves a location lookup per bucket.
        part_size: multipart part size in bytes (0: minio's choice, 5 MiB for all but
            huge files). Bounds upload memory together with ``parallel_uploads``.
        parallel_uploads: parts uploaded at once; raise it for throughput on real S3.
        connect_timeout: seconds to open a connection.
        read_timeout: seconds to wait on one socket read (not a whole transfer).
        retries: urllib3 retries on connection errors and 500/502/503/504.
        http_client: a ready urllib3 pool (tests, custom TLS); the timeouts and retries
            above are then ignored. The store does not close a pool it was given.
    """

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        secure: bool = False,
        region: str | None = None,
        *,
        part_size: int = 0,
        parallel_uploads: int = 1,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        retries: int = 3,
        http_client: urllib3.PoolManager | None = None,
        public_endpoint: str | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._bucket = bucket
        self._part_size = part_size
        self._parallel_uploads = max(1, parallel_uploads)
        self._owns_http = http_client is None
        self._http = http_client or urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            # One connection per worker thread asyncio.to_thread may run at once.
            maxsize=32,
            # TLS: verified against the system trust store (OpenSSL's defaults, which honour
            # SSL_CERT_FILE / SSL_CERT_DIR), so private CAs work the usual way.
            cert_reqs="CERT_REQUIRED",
            retries=urllib3.Retry(
                total=retries,
                backoff_factor=0.2,
                status_forcelist=[500, 502, 503, 504],
            ),
        )
        self._client = Minio(
            endpoint,
            access_key=access_key or None,
            secret_key=secret_key or None,
            secure=secure,
            region=region,
            http_client=self._http,
        )

        # Presigned URLs are signed for the host clients will use, and signing must not
        # need a region lookup over the network (the public name may not resolve here).
        self._signer = Minio(
            public_endpoint or endpoint,
            access_key=access_key or None,
            secret_key=secret_key or None,
            secure=secure,
            region=region or "us-east-1",
            http_client=self._http,
        )

    @property
    def bucket(self) -> str:
        return self._bucket

    def __repr__(self) -> str:
        return f"S3Store(endpoint={self._endpoint!r}, bucket={self._bucket!r})"

    # --- interface --------------------------------------------------------------------

    async def ensure_ready(self) -> None:
        def run() -> None:
            if self._client.bucket_exists(self._bucket):
                return
            try:
                self._client.make_bucket(self._bucket)
            except S3Error as exc:
                # Another process created it between our check and our create.
                if exc.code not in _BUCKET_MINE_CODES:
                    raise

        await self._call(None, run)

    async def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> ObjectInfo:
        validate_key(key)
        return await self._call(
            key, self._put_stream, key, io.BytesIO(data), len(data), content_type
        )

    async def put_file(
        self, key: str, path: str | os.PathLike[str], content_type: str | None = None
    ) -> ObjectInfo:
        validate_key(key)

        def run() -> ObjectInfo:
            try:
                src = open(path, "rb")
                size = os.fstat(src.fileno()).st_size
            except OSError as exc:
                raise _CallerIOError(exc) from exc
            with src:
                return self._put_stream(key, src, size, content_type)

        return await self._call(key, run)

    async def get_bytes(self, key: str) -> bytes:
        validate_key(key)

        def run() -> bytes:
            response = self._client.get_object(self._bucket, key)
            try:
                return response.read()
            finally:
                _release(response)

        return await self._call(key, run)

    async def get_file(self, key: str, path: str | os.PathLike[str]) -> ObjectInfo:
        validate_key(key)

        def run() -> ObjectInfo:
            response = self._client.get_object(self._bucket, key)
            try:
                # One request: the info describes exactly the bytes we wrote.
                info = _info_from_headers(key, response)
                try:
                    write_atomically(path, _stream(response, DEFAULT_CHUNK_SIZE))
                except OSError as exc:
                    raise _CallerIOError(exc) from exc
                return info
            finally:
                _release(response)

        return await self._call(key, run)

    def iter_chunks(
        self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> AsyncGenerator[bytes, None]:
        validate_key(key)
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        return self._iter_chunks(key, chunk_size)

    async def _iter_chunks(self, key: str, chunk_size: int) -> AsyncGenerator[bytes, None]:
        response = await self._call(key, self._client.get_object, self._bucket, key)
        try:
            while chunk := await self._call(key, response.read, chunk_size):
                yield chunk
        finally:
            # Also on early exit (aclose, cancellation): close() drops an unread body so the
            # connection is not handed back mid-stream; both calls are non-blocking.
            _release(response)

    async def stat(self, key: str) -> ObjectInfo:
        validate_key(key)
        obj = await self._call(key, self._client.stat_object, self._bucket, key)
        return ObjectInfo(
            key=key,
            size=int(obj.size or 0),
            etag=_etag(obj.etag),
            last_modified=_timestamp(obj.last_modified),
            content_type=obj.content_type,
        )

    async def list(self, prefix: str) -> builtins.list[ObjectInfo]:
        validate_prefix(prefix)
        return await self._call(None, self._list, prefix)

    async def delete(self, key: str) -> None:
        validate_key(key)
        # S3 answers 204 for a missing key too, which is the idempotence we want.
        await self._call(key, self._client.remove_object, self._bucket, key)

    async def delete_prefix(self, prefix: str) -> int:
        validate_prefix(prefix)

        def run() -> int:
            keys = [info.key for info in self._list(prefix)]
            if not keys:
                return 0
            # remove_objects is lazy: nothing is deleted until its result is iterated.
            errors = builtins.list(
                self._client.remove_objects(self._bucket, (DeleteObject(k) for k in keys))
            )
            if errors:
                first = errors[0]
                raise StoreUnavailable(
                    f"could not delete {len(errors)} of {len(keys)} objects under "
                    f"{prefix!r}: {first.code} {first.message}",
                    details={"prefix": prefix, "failed": len(errors)},
                )
            return len(keys)

        return await self._call(None, run)

    async def presign_put(self, key: str, expires_s: float) -> str:
        validate_key(key)
        return await self._call(key, self._signer.presigned_put_object, self._bucket, key,
                                expires=timedelta(seconds=expires_s))

    async def presign_get(self, key: str, expires_s: float, filename: str | None = None) -> str:
        validate_key(key)
        headers: dict[str, str | list[str] | tuple[str]] | None = (
            {"response-content-disposition": f'attachment; filename="{filename}"'}
            if filename else None)
        return await self._call(key, self._signer.presigned_get_object, self._bucket, key,
                                expires=timedelta(seconds=expires_s),
                                response_headers=headers)

    async def check(self) -> None:
        exists = await self._call(None, self._client.bucket_exists, self._bucket)
        if not exists:
            raise StoreUnavailable(
                f"bucket {self._bucket!r} does not exist", details={"bucket": self._bucket}
            )

    async def close(self) -> None:
        if self._owns_http:
            self._http.clear()

    # --- blocking helpers (run in a worker thread) ------------------------------------

    def _put_stream(
        self, key: str, data: BinaryIO, size: int, content_type: str | None
    ) -> ObjectInfo:
        content_type = content_type or DEFAULT_CONTENT_TYPE
        result = self._client.put_object(
            self._bucket,
            key,
            data,
            size,
            content_type=content_type,
            part_size=self._part_size,
            num_parallel_uploads=self._parallel_uploads,
        )
        # A PUT response carries the etag but rarely Last-Modified; the server stamps the
        # object when the request completes, which is now to within the clock skew.
        if result.last_modified is not None:
            last_modified = result.last_modified.timestamp()
        else:
            last_modified = _http_date(result.http_headers.get("last-modified"))
        return ObjectInfo(
            key=key,
            size=size,
            etag=_etag(result.etag),
            last_modified=last_modified,
            content_type=content_type,
        )

    def _list(self, prefix: str) -> builtins.list[ObjectInfo]:
        found = [
            ObjectInfo(
                key=obj.object_name or "",
                size=int(obj.size or 0),
                etag=_etag(obj.etag),
                last_modified=_timestamp(obj.last_modified),
                content_type=obj.content_type,
            )
            for obj in self._client.list_objects(self._bucket, prefix=prefix, recursive=True)
            if obj.object_name and not obj.is_dir
        ]
        # S3 lists in UTF-8 byte order, which equals code point order; sort anyway so the
        # contract does not rest on every S3 clone getting that right.
        found.sort(key=lambda info: info.key)
        return found

    async def _call(
        self, key: str | None, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run a blocking minio call in a thread and translate its failures."""
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except _CallerIOError as exc:
            raise exc.error from None
        except S3Error as exc:
            if key is not None and exc.code in _NOT_FOUND_CODES:
                raise ObjectNotFound(key) from exc
            if exc.code == "NoSuchBucket":
                raise StoreUnavailable(
                    f"bucket {self._bucket!r} does not exist (ensure_ready not run?)",
                    details={"bucket": self._bucket},
                ) from exc
            raise StoreUnavailable(
                f"S3 error {exc.code}: {exc.message}",
                details={"s3_code": exc.code, "bucket": self._bucket, "key": key},
            ) from exc
        except ServerError as exc:
            raise StoreUnavailable(
                f"S3 server error {exc.status_code} at {self._endpoint}",
                details={"status": exc.status_code},
            ) from exc
        except InvalidResponseError as exc:
            raise StoreUnavailable(f"unexpected S3 response from {self._endpoint}: {exc}") from exc
        except MinioException as exc:
            raise StoreUnavailable(f"S3 request failed: {exc}") from exc
        except _NETWORK_ERRORS as exc:
            raise StoreUnavailable(
                f"S3 endpoint {self._endpoint} unreachable: {exc}",
                details={"endpoint": self._endpoint},
            ) from exc


# --- module helpers -----------------------------------------------------------------------


def _release(response: BaseHTTPResponse) -> None:
    response.close()
    response.release_conn()


def _stream(response: BaseHTTPResponse, chunk_size: int) -> Iterator[bytes]:
    while chunk := response.read(chunk_size):
        yield chunk


def _etag(value: str | None) -> str:
    return (value or "").strip('"')


def _timestamp(value: datetime | None) -> float:
    return value.timestamp() if value is not None else 0.0


def _http_date(value: str | None) -> float:
    """Parse an HTTP date; a missing or odd one means "just now" (see ``_put_stream``)."""
    if value:
        try:
            return from_http_header(value).timestamp()
        except ValueError:
            pass
    return time.time()


def _info_from_headers(key: str, response: BaseHTTPResponse) -> ObjectInfo:
    headers = response.headers
    return ObjectInfo(
        key=key,
        size=int(headers.get("content-length", "0")),
        etag=_etag(headers.get("etag")),
        last_modified=_http_date(headers.get("last-modified")),
        content_type=headers.get("content-type"),
    )
