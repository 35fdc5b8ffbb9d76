"""Job requests from other services on ``ingest.request``: a ``JobSubmit`` or a CloudEvent.

Three shapes are accepted, told apart the way the CloudEvents NATS binding says:

* structured CloudEvent: ``content-type: application/cloudevents+json`` (or a JSON body with
  ``specversion``); the body holds ``specversion``, ``type``, ``source``, ``id`` and ``data``
  (or ``data_base64``);
* binary CloudEvent: ``ce-specversion``, ``ce-type``, ``ce-source``, ``ce-id`` headers
  (values percent-encoded), the body is the data;
* anything else: the body is a ``JobSubmit`` (JSON Schema from ``jetcut schema``).

The CloudEvent ``type`` says what ``data`` is: ``io.jetcut.job.request`` -> the body of
``POST /v1/jobs`` (``recipe``/``steps``, ``input``/``inputs``, ``params``);
``io.jetcut.job.submit`` -> a ``JobSubmit``. ``source`` + ``id`` are the idempotency key
(the spec says they identify one event), so a redelivered CloudEvent is one job. The
extension attribute ``tenant`` names the tenant (default: ``default_tenant``).

Nothing here does I/O; every refusal is a ``PermanentError`` with ``invalid_event``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

import msgspec
from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings.http import HTTPMessage, from_binary, from_structured
from cloudevents.core.exceptions import BaseCloudEventException
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from shared.errors import ErrorCode, PermanentError
from shared.events import JobSubmit, StepSpec, decode
from shared.jobrequest import JobRequest

TYPE_REQUEST = "io.jetcut.job.request"
TYPE_SUBMIT = "io.jetcut.job.submit"
_FORMAT = JSONFormat()


@dataclass(frozen=True)
class Draft:
    """A request, parsed but not yet checked against the store or the recipes."""

    mode: str
    """``structured``, ``binary`` or ``job.submit``: for logs and metrics."""
    tenant: str
    recipe: str | None
    steps: dict[str, StepSpec] | None
    params: dict[str, Any]
    refs: list[str]
    job_id: str | None
    idempotency_key: str | None
    callback_url: str | None = None
    callback_secret: str | None = None


def invalid(message: str, **details: Any) -> PermanentError:
    return PermanentError(ErrorCode.INVALID_EVENT, message, details=details)


def _strict_event(attributes: dict[str, Any], data: Any) -> BaseCloudEvent:
    # The SDK's constructor invents a missing id (a random UUID) and specversion; for us
    # the id is the idempotency key, so a missing one is an error, not a fresh job.
    for name in ("specversion", "id"):
        if name not in attributes:
            raise invalid(f"CloudEvent attribute {name!r} is missing", attribute=name)
    if attributes["specversion"] != "1.0":
        raise invalid(f"CloudEvents specversion {attributes['specversion']!r} is not 1.0")
    return CloudEvent(attributes, data)


def parse(headers: dict[str, str] | None, body: bytes, default_tenant: str) -> Draft:
    """Parse one request message.

    Raises:
        PermanentError: ``invalid_event`` naming what is wrong.
    """
    lower = {k.lower(): v for k, v in (headers or {}).items()}
    content_type = lower.get("content-type", "").lower()
    if content_type.startswith("application/cloudevents-batch"):
        raise invalid("batched CloudEvents are not accepted: send one event per request")
    if content_type.startswith("application/cloudevents"):
        return _from_cloudevent(HTTPMessage(headers=lower, body=body), "structured",
                                default_tenant)
    if any(k.startswith("ce-") for k in lower):
        return _from_cloudevent(HTTPMessage(headers=lower, body=body), "binary",
                                default_tenant)
    try:
        probe = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"the request is not JSON: {exc}") from None
    if isinstance(probe, dict) and "specversion" in probe:
        return _from_cloudevent(HTTPMessage(headers=lower, body=body), "structured",
                                default_tenant)
    try:
        event = decode(JobSubmit, body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise invalid(f"not a JobSubmit or CloudEvent: {exc}") from None
    return _from_submit(event, "job.submit", keyed=True)


def _from_submit(event: JobSubmit, mode: str, *, keyed: bool) -> Draft:
    if not keyed and (event.job_id is not None or event.idempotency_key is not None):
        raise invalid("a CloudEvent's source and id name its job: leave job_id and "
                      "idempotency_key out of its data")
    return Draft(mode=mode, tenant=event.tenant, recipe=event.recipe, steps=event.steps,
                 params=dict(event.params), refs=[i.key for i in event.inputs],
                 job_id=event.job_id, idempotency_key=event.idempotency_key,
                 callback_url=event.callback_url, callback_secret=event.callback_secret)


def _from_cloudevent(message: HTTPMessage, mode: str, default_tenant: str) -> Draft:
    try:
        if mode == "binary":
            ce = from_binary(message, _FORMAT, _strict_event)
        else:
            ce = from_structured(message, _FORMAT, _strict_event)
    except PermanentError:
        raise
    except (BaseCloudEventException, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise invalid(f"not a valid {mode} CloudEvent: {exc}") from None
    content_type = ce.get_datacontenttype()
    if content_type and not JSONFormat.JSON_CONTENT_TYPE_PATTERN.match(content_type):
        raise invalid(f"datacontenttype {content_type!r} is not JSON")
    data = ce.get_data()
    if isinstance(data, (bytes, str)):
        try:
            data = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise invalid(f"the CloudEvent's data is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise invalid("the CloudEvent's data must be a JSON object (the job request)")
    tenant = ce.get_extension("tenant") or default_tenant
    if not isinstance(tenant, str):
        raise invalid("the tenant extension attribute must be a string")
    key = "ce:" + json.dumps([ce.get_source(), ce.get_id()], separators=(",", ":"))
    kind = ce.get_type()
    try:
        if kind == TYPE_SUBMIT:
            submit = msgspec.convert({**data, "tenant": data.get("tenant", tenant)}, JobSubmit)
            return replace(_from_submit(submit, mode, keyed=False), idempotency_key=key)
        if kind == TYPE_REQUEST:
            request = msgspec.convert(data, JobRequest)
        else:
            raise invalid(f"CloudEvent type {kind!r} is not one jetcut takes: use "
                          f"{TYPE_REQUEST!r} or {TYPE_SUBMIT!r}", type=kind)
    except msgspec.ValidationError as exc:
        raise invalid(f"the {kind} CloudEvent's data is not valid: {exc}") from None
    return Draft(mode=mode, tenant=tenant, recipe=request.recipe, steps=request.steps,
                 params=dict(request.params), refs=request.refs, job_id=None,
                 idempotency_key=key, callback_url=request.callback_url,
                 callback_secret=request.callback_secret)
