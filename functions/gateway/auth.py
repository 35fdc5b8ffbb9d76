"""Who is calling: API keys to tenants, admin scope, and per-key / per-address rate limits.

Every route except the probes (``/healthz``, ``/readyz``, ``/metrics``), the API description
(``/v1/openapi*``, ``/v1/docs*``) and handlers with ``opt={"public": True}`` passes
``authenticate``, an app-wide guard:

1. the client address takes a token from its bucket (so floods of bad keys are limited too);
2. the key (``Authorization: Bearer <key>`` or ``X-API-Key``) is checked against the key
   store: missing, malformed, unknown or revoked is 401 ``unauthorized``; with
   ``JETCUT_ALLOW_ANONYMOUS`` a request with no key at all acts as the default tenant;
3. the key takes a token from its own bucket.

The caller is kept on the request's scope for ``tenant_of``; ``ratelimit_headers`` (an ASGI
middleware) adds the ``RateLimit-*`` headers of the tighter bucket to every response.
"""

from __future__ import annotations

import asyncio
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from functions.gateway.errors import Unauthorized
from functions.gateway.ratelimit import Decision, TokenBuckets, tighter
from functions.gateway.views import Caller, caller_of, request_state
from shared.errors import ErrorCode, PermanentError
from shared.function import Services
from shared.keys import KeyStore

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
"""Probes and scrapes stay open: orchestrators and Prometheus hold no key."""
PUBLIC_PREFIXES = ("/v1/openapi", "/v1/docs")
"""The API's description holds no tenant's data, and a browser reading it sends no key."""


class Auth:
    """The gateway's key store (opened on first use) and rate-limit buckets."""

    def __init__(self, services: Services) -> None:
        self.services = services
        s = services.settings
        self.per_key = (TokenBuckets(s.rate_limit_key_per_s, s.rate_limit_key_burst)
                        if s.rate_limit_key_per_s > 0 else None)
        self.per_address = (TokenBuckets(s.rate_limit_address_per_s, s.rate_limit_address_burst)
                            if s.rate_limit_address_per_s > 0 else None)
        self._keys: KeyStore | None = None
        self._opening = asyncio.Lock()

    async def keys(self) -> KeyStore:
        async with self._opening:
            if self._keys is None:
                s = self.services
                self._keys = await KeyStore.open(s.bus.js, s.names, s.settings)
            return self._keys


def client_address(connection: ASGIConnection[Any, Any, Any, Any], trust_forwarded: bool) -> str:
    """The TCP peer, or behind a trusted proxy the last hop it appended."""
    if trust_forwarded:
        forwarded = connection.headers.get("x-forwarded-for", "")
        hops = [h.strip() for h in forwarded.split(",") if h.strip()]
        if hops:
            return hops[-1][:64]
    return connection.client.host if connection.client else "unknown"


def presented_key(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    """The key the request carries; an ``Authorization`` that is not Bearer is refused."""
    authorization = connection.headers.get("authorization")
    if authorization is not None:
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise Unauthorized("use 'Authorization: Bearer <key>' (or 'X-API-Key: <key>')")
        return credentials.strip()
    key = connection.headers.get("x-api-key")
    return key.strip() if key is not None else None


def _limited(decision: Decision, who: str) -> PermanentError:
    # The RateLimit-* headers come from ``ratelimit_headers`` (the refusal is the tighter
    # decision), Retry-After from ``details.retry_after_s``.
    return PermanentError(ErrorCode.RATE_LIMITED,
                          f"too many requests from this {who}; retry in "
                          f"{decision.retry_after_s}s",
                          details={"retry_after_s": decision.retry_after_s,
                                   "limit": decision.limit, "policy": decision.policy,
                                   "scope": who})


async def authenticate(connection: ASGIConnection[Any, Any, Any, Any],
                       handler: BaseRouteHandler) -> None:
    """App-wide guard: resolve the caller and apply the rate limits (see module doc)."""
    path = connection.scope["path"]
    if handler.opt.get("public") or path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
        return
    auth: Auth = connection.app.state.auth
    settings = auth.services.settings
    state = request_state(connection.scope)
    by_address = None
    if auth.per_address is not None:
        by_address = auth.per_address.take(client_address(connection,
                                                          settings.trust_forwarded_for))
        state["ratelimit"] = by_address
        if not by_address.allowed:
            raise _limited(by_address, "client address")
    key = presented_key(connection)
    if key is None:
        if not settings.allow_anonymous:
            raise Unauthorized("an API key is required: 'Authorization: Bearer <key>'",
                               invalid_token=False)
        state["caller"] = Caller(tenant=settings.default_tenant, key_id=None, admin=True)
        return
    record = await (await auth.keys()).verify(key)
    if record is None:
        raise Unauthorized("the API key is not valid (unknown, malformed or revoked)")
    state["caller"] = Caller(tenant=record.tenant, key_id=record.key_id, admin=record.admin)
    if auth.per_key is not None:
        by_key = auth.per_key.take(record.key_id)
        state["ratelimit"] = tighter(by_address, by_key)
        if not by_key.allowed:
            raise _limited(by_key, "API key")


async def require_admin(connection: ASGIConnection[Any, Any, Any, Any],
                        handler: BaseRouteHandler) -> None:
    """Route guard for operator endpoints (the DLQ holds every tenant's messages)."""
    caller = caller_of(connection)
    if caller is None or not caller.admin:
        raise PermanentError(ErrorCode.FORBIDDEN, "this endpoint needs an admin API key "
                             "(jetcut keys create --admin)")


def ratelimit_headers(app: ASGIApp) -> ASGIApp:
    """ASGI middleware: every guarded response tells the client where its budget stands."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            decision = request_state(scope).get("ratelimit")
            if message["type"] == "http.response.start" and isinstance(decision, Decision):
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                for name, value in decision.headers().items():
                    if name.lower().encode() not in present:
                        headers.append((name.lower().encode(), value.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await app(scope, receive, send_with_headers)

    return middleware
