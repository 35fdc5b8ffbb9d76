"""No input of any shape makes the gateway answer 5xx or leak a stack trace.

Every route the app serves (taken from its OpenAPI document, so a new route is covered the
day it is added) gets a few hundred generated requests: random bytes, JSON of the wrong
shape, hostile path segments and query values, absurd headers. Each answer must be below
500 and, when it is an error, in the one error shape with a known code. The generator is
seeded, so a failure names a request that can be replayed.
"""

from __future__ import annotations

import json
import random
from typing import Any

import httpx
import pytest

from functions.registry import FUNCTIONS
from shared.errors import ErrorCode
from tests.support.nats import running, until_http_up

pytestmark = pytest.mark.timeout(120)

SEED = 20261123
CODES = {c.value for c in ErrorCode}
SEGMENTS = ["x", "jnope", "..", "%2e%2e", "u" + "a" * 26, "0", "-1", "999999999999999999999",
            "a" * 300, "%00", "😀", "j%2Fetc%2Fpasswd", "x:retry", "x:nope", ":", "1:replay"]
VALUES = ["", "0", "-5", "1e309", "true", "null", "a" * 2000, "%00", "[]", "{}", "😀", "\u202e"]


def bodies(rng: random.Random) -> list[bytes]:
    """Bodies a confused or hostile client might send."""
    scalars: list[Any] = [None, True, 0, -1, 2**70, 1.5e308, "", "x" * 5000, "😀", [], {}]
    shapes: list[Any] = [
        {"recipe": rng.choice(scalars), "input": rng.choice(scalars)},
        {"steps": {"a": {"stage": rng.choice(scalars), "uses": rng.choice(scalars)}},
         "input": "x"},
        {"steps": {"a": {"stage": "noop", "uses": ["a"]}}, "input": "x"},  # a cycle
        {"recipe": "web", "inputs": [rng.choice(scalars)] * 3, "params": rng.choice(scalars)},
        {"recipe": "web", "input": "x", "callback_url": rng.choice(
            ["file:///etc/passwd", "http://127.0.0.1:1/", "gopher://x", "http://u:p@h/", 7])},
        {"jobs": rng.choice(scalars)},
        {"jobs": [{"recipe": "web"}] * rng.randint(0, 3)},
        rng.choice(scalars),
    ]
    return [
        json.dumps(rng.choice(shapes)).encode(),
        bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64))),
        b"{" * rng.randint(1, 5000),  # deep nesting
        b'{"recipe": "web", "input": "x", "params": ' + b"[" * 3000 + b"]" * 3000 + b"}",
    ]


Request = tuple[str, str, dict[str, Any]]
HEADER_VALUES = [v for v in VALUES if v.isascii() and "%" not in v]


def requests(paths: list[tuple[str, str]], rng: random.Random) -> list[Request]:
    out: list[Request] = []
    for method, template in paths:
        for _ in range(6):
            path = template
            while "{" in path:
                start, end = path.index("{"), path.index("}")
                path = path[:start] + rng.choice(SEGMENTS) + path[end + 1:]
            params = {rng.choice(["limit", "cursor", "after", "function", "status", "all",
                                  "presign", "filename", "last_event_id", "created_after"]):
                      rng.choice(VALUES) for _ in range(rng.randint(0, 3))}
            headers = rng.choice([{}, {"Idempotency-Key": rng.choice(HEADER_VALUES) or "k"},
                                  {"Last-Event-ID": rng.choice(HEADER_VALUES) or "x"},
                                  {"Content-Type": "application/cloudevents+json"}])
            content = rng.choice(bodies(rng)) if method in ("POST", "PUT", "PATCH") else None
            out.append((method, path, {"params": params, "headers": headers,
                                       "content": content}))
    return out


async def test_no_request_gets_a_5xx_or_a_stack_trace(make_settings, http_port) -> None:  # type: ignore[no-untyped-def]
    # The gateway alone: a 503 for "the queue is unavailable" must not be what a bad
    # request gets, so the whole submit path (NATS, store) is up.
    settings = make_settings(http_port=http_port, max_upload_bytes=100_000)
    async with running(settings, [FUNCTIONS["gateway"], FUNCTIONS["conductor"]]):
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=30) as client:
            await until_http_up(client)
            spec = (await client.get("/v1/openapi.json")).json()
            paths = [(method.upper(), path) for path, ops in spec["paths"].items()
                     for method in ops if method in ("get", "post", "delete", "put", "patch")]
            assert len(paths) >= 15, paths
            rng = random.Random(SEED)
            checked = 0
            for method, path, kwargs in requests(paths, rng):
                if path.endswith("/events") and method == "GET":
                    kwargs["params"] = {}  # a live stream of a real job never ends by itself
                r = await client.request(method, path, **kwargs)
                where = f"{method} {path} {kwargs['params']} {kwargs['headers']}"
                assert r.status_code < 500 or r.status_code == 501, f"{where}: {r.text[:300]}"
                assert "Traceback" not in r.text, where
                if r.status_code >= 400:
                    error = r.json()["error"]
                    assert error["code"] in CODES, f"{where}: {error}"
                    assert isinstance(error["message"], str) and error["message"]
                checked += 1
            assert checked == len(paths) * 6
