"""``/v1/uploads``: stream a file into the store in constant memory, or (S3 store) get a
presigned URL to PUT it straight into the bucket."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
import unicodedata
from typing import Any

import msgspec
from litestar import Controller, Request, post
from litestar.params import FromQuery

from functions.gateway.deps import ServicesDep
from functions.gateway.openapi import errors, request_body
from functions.gateway.views import (
    UploadView,
    tenant_of,
)
from shared.errors import ErrorCode, MalformedRequest, PermanentError
from shared.function import Services
from shared.ids import new_upload_id
from shared.submission import upload_key


def safe_filename(name: str) -> str:
    """A display name only (keys are built from minted ids); still keep it boring."""
    name = unicodedata.normalize("NFKC", os.path.basename(name.replace("\\", "/")))
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "upload"
    return name[:100]


class PresignedUpload(msgspec.Struct):
    upload_id: str
    """Use it as a job ``input`` once the PUT succeeded."""
    key: str
    filename: str
    method: str
    url: str
    """PUT the file's bytes here (any S3 client or ``curl -T``), before ``expires_at``."""
    expires_at: float
    max_bytes: int
    """Larger objects are refused when a job names them (an S3 PUT URL cannot cap size)."""


class UploadController(Controller):
    """Uploads: the inputs of jobs."""

    path = "/uploads"
    tags = ["uploads"]

    @post("/", request_max_body_size=None, status_code=201,
          responses=errors(400, 413, 503),
          opt=request_body(None, "application/octet-stream"))
    async def upload(self, request: Request[Any, Any, Any], services: ServicesDep,
                     filename: FromQuery[str] = "upload") -> UploadView:
        """The request body is the file; ``upload_id`` names it as a job's input."""
        return await _receive(request, services, filename)


class PresignController(Controller):
    """``POST /v1/uploads:presign`` (a custom method on the uploads collection)."""

    path = "/uploads:presign"
    tags = ["uploads"]

    @post("/", status_code=201, responses=errors(501, 503))
    async def presign_upload(self, request: Request[Any, Any, Any], services: ServicesDep,
                             filename: FromQuery[str] = "upload") -> PresignedUpload:
        """A short-lived URL to PUT a file straight into S3 (the gateway never sees its
        bytes). Only with the S3 store: the local store answers ``501 not_supported``."""
        tenant = tenant_of(request)
        upload_id = new_upload_id()
        name = safe_filename(filename)
        key = upload_key(tenant, upload_id, name)
        expiry = services.settings.presign_expiry_s
        url = await services.store.presign_put(key, expiry)  # NotSupported: 501
        return PresignedUpload(upload_id=upload_id, key=key, filename=name, method="PUT",
                               url=url, expires_at=time.time() + expiry,
                               max_bytes=services.settings.max_upload_bytes)


async def _receive(request: Request[Any, Any, Any], services: Services,
                   filename: str) -> UploadView:
    tenant = tenant_of(request)
    limit = services.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PermanentError(ErrorCode.PAYLOAD_TOO_LARGE, f"uploads are limited to {limit} bytes")
    upload_id = new_upload_id()
    name = safe_filename(filename)
    key = upload_key(tenant, upload_id, name)
    digest = hashlib.sha256()
    size = 0
    # Spool to disk, never to memory: multi-GB uploads use constant memory.
    with tempfile.NamedTemporaryFile(dir=services.settings.work_dir, prefix="upload-") as spool:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PermanentError(ErrorCode.PAYLOAD_TOO_LARGE,
                                     f"uploads are limited to {limit} bytes")
            digest.update(chunk)
            spool.write(chunk)
        spool.flush()
        if size == 0:
            raise MalformedRequest("the upload is empty")
        await services.store.put_file(key, spool.name)
    return UploadView(upload_id=upload_id, key=key, filename=name, size=size,
                      sha256=digest.hexdigest())
