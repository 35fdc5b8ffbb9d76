"""Job callbacks (webhooks): which URLs jetcut may call, and how a call is signed.

A job may name a ``callback_url``; the ``notify`` function POSTs the job's status changes
there. Two things make that safe to offer to anyone who can submit a job:

* **Outbound URL validation.** Only ``http``/``https``, no credentials in the URL, and no
  loopback, private, link-local, shared, multicast or otherwise non-global address unless the
  operator allows it (``JETCUT_CALLBACK_ALLOW_PRIVATE``). The gateway checks at submit time
  (422 ``invalid_callback``); ``notify`` checks again at send time, every address the name
  resolves to, and then connects to the address it checked (so a DNS answer that changes
  between the check and the connection, DNS rebinding, cannot point it inside the network).
* **Signatures.** Each POST carries ``X-Jetcut-Signature: t=<unix seconds>,v1=<hex>``, the
  HMAC-SHA256 of ``<t>.<raw body>`` under the job's ``callback_secret`` (or the deployment's
  ``JETCUT_CALLBACK_SECRET``), as Stripe does: a receiver recomputes it, compares in constant
  time and refuses old timestamps (:func:`verify`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import socket
import time
from typing import TYPE_CHECKING
from urllib.parse import SplitResult, urlsplit

from shared.errors import ErrorCode, PermanentError

if TYPE_CHECKING:
    from shared.settings import Settings

__all__ = [
    "MAX_URL_LENGTH",
    "SIGNATURE_HEADER",
    "CallbackTarget",
    "InvalidCallback",
    "check_address",
    "parse_url",
    "resolve",
    "sign",
    "signature_header",
    "validate",
    "verify",
]

SIGNATURE_HEADER = "X-Jetcut-Signature"
MAX_URL_LENGTH = 2048
SECRET_MIN_LENGTH = 16
RESOLVE_TIMEOUT_S = 5.0

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class InvalidCallback(PermanentError):
    """A callback URL jetcut will not call; ``details.reason`` says why (``scheme``,
    ``credentials``, ``malformed``, ``unresolvable``, ``private_address``, ``secret``)."""

    def __init__(self, message: str, reason: str, **details: str) -> None:
        super().__init__(ErrorCode.INVALID_CALLBACK, message,
                         details={"reason": reason, **details})
        self.reason = reason


class CallbackTarget:
    """A parsed callback URL: what to connect to and what to ask for."""

    def __init__(self, url: str, parts: SplitResult, host: str, port: int) -> None:
        self.url = url
        self.scheme = parts.scheme
        self.host = host
        self.port = port
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        default = 443 if self.scheme == "https" else 80
        self.host_header = _bracket(host) + ("" if port == default else f":{port}")

    def url_for(self, address: IPAddress) -> str:
        """The URL with the host replaced by ``address`` (the one that was checked)."""
        return f"{self.scheme}://{_bracket(str(address))}:{self.port}{self.path}"


def parse_url(url: str) -> CallbackTarget:
    """Check a callback URL's shape (no network).

    Raises:
        InvalidCallback: not http(s), credentials in it, no host, a bad port, too long.
    """
    if len(url) > MAX_URL_LENGTH:
        raise InvalidCallback(f"callback_url is longer than {MAX_URL_LENGTH} characters",
                              "malformed")
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        raise InvalidCallback("callback_url must not contain spaces or control characters",
                              "malformed")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidCallback(f"callback_url is not a valid URL: {exc}", "malformed") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidCallback(f"callback_url must be http or https, not {parts.scheme!r}",
                              "scheme")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise InvalidCallback("callback_url must not carry credentials (user:password@); "
                              "receivers authenticate callbacks by their signature",
                              "credentials")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise InvalidCallback("callback_url has no host", "malformed")
    if port == 0:
        raise InvalidCallback("callback_url has port 0", "malformed")
    return CallbackTarget(url, parts, host, port or (443 if parts.scheme == "https" else 80))


def check_address(address: IPAddress, *, allow_private: bool) -> str | None:
    """Why jetcut must not call ``address`` (``None``: it may).

    Anything that is not a global unicast address is refused unless ``allow_private``:
    loopback, RFC 1918 and unique-local, link-local (cloud metadata at 169.254.169.254),
    shared CGNAT space, documentation and reserved ranges; IPv4-mapped IPv6 addresses are
    judged as the IPv4 address they carry. Multicast and unspecified never make sense.
    """
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_multicast or address.is_unspecified:
        return "a multicast or unspecified address"
    if allow_private:
        return None
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_private or not address.is_global:
        return "a private or non-global address"
    return None


async def resolve(target: CallbackTarget, *, allow_private: bool) -> list[IPAddress]:
    """Every address ``target``'s host has, each one checked.

    Raises:
        InvalidCallback: ``unresolvable``, or ``private_address`` when *any* address is
            refused (a name with one public and one private address could be steered to
            the private one).
    """
    try:
        literal: IPAddress | None = ipaddress.ip_address(target.host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [literal]
    else:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM),
                RESOLVE_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            raise InvalidCallback(f"callback host {target.host!r} does not resolve: {exc}",
                                  "unresolvable", host=target.host) from None
        addresses = list(dict.fromkeys(
            ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos))
    for address in addresses:
        why = check_address(address, allow_private=allow_private)
        if why is not None:
            raise InvalidCallback(
                f"callback host {target.host!r} is {why} ({address}); jetcut calls only "
                "public addresses unless JETCUT_CALLBACK_ALLOW_PRIVATE is set",
                "private_address", host=target.host, address=str(address))
    if not addresses:
        raise InvalidCallback(f"callback host {target.host!r} has no address",
                              "unresolvable", host=target.host)
    return addresses


async def validate(url: str, secret: str | None, settings: Settings) -> CallbackTarget:
    """Everything the gateway checks before it accepts a job with a callback.

    Raises:
        InvalidCallback: the URL is refused, or no secret would sign the callbacks.
    """
    target = parse_url(url)
    if secret is not None and not SECRET_MIN_LENGTH <= len(secret) <= 256:
        raise InvalidCallback(f"callback_secret must be {SECRET_MIN_LENGTH}-256 characters",
                              "secret")
    if secret is None and not settings.callback_secret:
        raise InvalidCallback("give a callback_secret: this deployment has no default "
                              "signing secret (JETCUT_CALLBACK_SECRET)", "secret")
    await resolve(target, allow_private=settings.callback_allow_private)
    return target


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of ``<timestamp>.<body>`` under ``secret``."""
    message = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signature_header(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The ``X-Jetcut-Signature`` value for ``body``: ``t=<unix seconds>,v1=<hex>``."""
    ts = int(time.time()) if timestamp is None else timestamp
    return f"t={ts},v1={sign(secret, ts, body)}"


def verify(secret: str, header: str, body: bytes, *, tolerance_s: float = 300.0,
           now: float | None = None) -> bool:
    """What a receiver does: True when ``header`` signs ``body`` under ``secret`` and its
    timestamp is within ``tolerance_s`` of ``now`` (a replayed old call is refused)."""
    fields: dict[str, list[str]] = {}
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        fields.setdefault(key, []).append(value)
    try:
        ts = int(fields["t"][0])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    expected = sign(secret, ts, body)
    return any(hmac.compare_digest(expected, given) for given in fields.get("v1", []))


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
