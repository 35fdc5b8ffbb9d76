"""notify — job callbacks (webhooks): POST a job's status changes to the URL it named.

Consumes: events.<tenant>.<job_id>  JobEvent  (EVENTS stream, durable ``notify-events``)
          only ``status`` events of jobs whose record has a ``callback_url``; progress and
          step events are acked untouched.
Does:     checks the URL again and every address its host resolves to (refused: no call),
          then POSTs a signed JSON body to the address it checked, with a short timeout and
          no redirects. A non-2xx answer, a timeout or a refused connection is retried with
          exponential backoff (``nak(delay)``: the message waits in the stream, nothing else
          waits for it) until the ``notify`` retry policy's deliveries are used up; then it
          gives up with a warning and ``jetcut_callbacks_total{outcome="given_up"}``.
Emits:    nothing on the bus; HTTP POSTs with ``X-Jetcut-Signature`` (see shared.callbacks).
"""

from __future__ import annotations

import logging
import time
import weakref

import httpx
import msgspec
from prometheus_client import CollectorRegistry, Counter

from shared.callbacks import SIGNATURE_HEADER, InvalidCallback, parse_url, resolve
from shared.callbacks import signature_header as signed
from shared.errors import RetryLater
from shared.events import ErrorInfo, JobEvent
from shared.function import Context, Function
from shared.jobstore import JobNotFound
from shared.retry import policy_for

function = Function(name="notify", doc=__doc__ or "")
log = logging.getLogger("jetcut.notify")
USER_AGENT = "jetcut-callbacks/1"


class CallbackBody(msgspec.Struct, frozen=True, kw_only=True):
    """What a receiver gets: one status change of one job."""

    type: str = "job.status"
    id: str
    """Stable for this event across retries (``<job_id>:<stream sequence>``): dedup on it."""
    job_id: str
    tenant: str
    status: str
    progress: float | None
    error: ErrorInfo | None
    at: float
    """When the status changed (unix seconds); retried deliveries can arrive out of order."""
    attempt: int
    links: dict[str, str]


_counters: weakref.WeakKeyDictionary[CollectorRegistry, Counter] = weakref.WeakKeyDictionary()


def callbacks_counter(registry: CollectorRegistry) -> Counter:
    """``jetcut_callbacks_total{outcome}`` in the process's registry (created on first use)."""
    counter = _counters.get(registry)
    if counter is None:
        counter = Counter("jetcut_callbacks_total",
                          "Callback POST attempts, by outcome: delivered, retried, given_up, "
                          "refused (URL or address not allowed, or no secret).",
                          ("outcome",), registry=registry)
        _counters[registry] = counter
    return counter


@function.subscribe("events", lambda n: n.all("events"), JobEvent, durable="notify-events",
                    concurrency=16)
async def on_event(event: JobEvent, ctx: Context) -> None:
    if event.kind != "status" or event.status is None:
        return
    services = ctx.services
    try:
        record = await services.jobs.get(event.job_id)
    except JobNotFound:
        return
    if not record.callback_url or record.tenant != event.tenant:
        return
    counter = callbacks_counter(services.telemetry.registry)
    settings = services.settings
    secret = record.callback_secret or settings.callback_secret
    event_id = f"{event.job_id}:{ctx.delivery.stream_seq}"
    if not secret:
        counter.labels("refused").inc()
        log.warning("callback %s of job %s not sent: no callback_secret and no "
                    "JETCUT_CALLBACK_SECRET to sign it with", event_id, event.job_id)
        return
    try:
        target = parse_url(record.callback_url)
        addresses = await resolve(target, allow_private=settings.callback_allow_private)
    except InvalidCallback as exc:
        counter.labels("refused").inc()
        log.warning("callback %s of job %s not sent: %s", event_id, event.job_id, exc.message)
        return
    body = msgspec.json.encode(CallbackBody(
        id=event_id, job_id=event.job_id, tenant=event.tenant, status=event.status,
        progress=event.progress, error=event.error, at=event.at,
        attempt=ctx.delivery.number,
        links={"job": f"{settings.base_url}/v1/jobs/{event.job_id}"},
    ))
    headers = {
        "Content-Type": "application/json", "User-Agent": USER_AGENT,
        "Host": target.host_header, "X-Jetcut-Event-Id": event_id,
        "X-Jetcut-Attempt": str(ctx.delivery.number),
        SIGNATURE_HEADER: signed(secret, body, int(time.time())),
    }
    failure = await _post(target.scheme, target.host, [target.url_for(a) for a in addresses],
                          body, headers, settings.callback_timeout_s)
    if failure is None:
        counter.labels("delivered").inc()
        return
    if ctx.delivery.last:
        counter.labels("given_up").inc()
        log.warning("callback %s of job %s to %s given up after %d attempts: %s", event_id,
                    event.job_id, target.host_header, ctx.delivery.number, failure)
        return
    counter.labels("retried").inc()
    delay = policy_for(settings, function.name).delay(ctx.delivery.number)
    log.info("callback %s of job %s failed (attempt %d of %d), retry in %.1fs: %s", event_id,
             event.job_id, ctx.delivery.number, ctx.delivery.max_deliver, delay, failure)
    raise RetryLater(delay, f"callback failed: {failure}")


async def _post(scheme: str, host: str, urls: list[str], body: bytes,
                headers: dict[str, str], timeout_s: float) -> str | None:
    """POST to the first checked address that answers; ``None`` on a 2xx, else why not.

    The URL names the checked address itself and the ``Host`` header (and TLS's SNI and
    certificate check) the name, so nothing resolves the name again after the check.
    ``trust_env=False``: a proxy from the environment would connect on our behalf.
    """
    extensions = {"sni_hostname": host} if scheme == "https" else {}
    failure = "no address"
    async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False,
                                 trust_env=False) as client:
        for url in urls:
            try:
                async with client.stream("POST", url, content=body, headers=headers,
                                         extensions=extensions) as response:
                    if 200 <= response.status_code < 300:
                        return None
                    return f"HTTP {response.status_code}"
            except httpx.ConnectError as exc:
                failure = f"connection failed: {exc!r}"  # try the host's next address
            except httpx.HTTPError as exc:
                return f"{type(exc).__name__}: {exc}"
    return failure
