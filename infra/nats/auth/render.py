"""Render infra/nats/auth/nats-server.conf and compose.yml from one table of who may do what.

    .venv/bin/python infra/nats/auth/render.py          # rewrite both files
    .venv/bin/python infra/nats/auth/render.py --check  # exit 1 if they are stale

One account (``JETCUT``, JetStream on) holds every stream, so functions share streams without
cross-account exports; inside it each function has its own user, allowed only the subjects
it needs: what it publishes, its own durable consumers (create, fetch, ack, info), the KV
buckets it reads and writes, and the JetStream API calls of start-up provisioning (every
function provisions the streams, so each may create/update exactly those streams). Replies
arrive on ``_INBOX.>``. Passwords are never in the file: each user's comes from the
environment of nats-server (``NATS_PASSWORD_<USER>``), and the same value is the function's
``JETCUT_NATS_PASSWORD``. Names are for the empty ``JETCUT_NAMESPACE``.

tests/test_nats_accounts.py checks that the committed files are this script's output, that
nats-server accepts them, and that real functions work (and are refused) under them.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent

STREAMS = ("JOBS", "STAGES", "EVENTS", "DLQ", "ADVISORIES", "INGEST", "KV_jobs")
STAGES = ("audio-extract", "concat", "encode-part", "loudnorm", "montage", "noop",
          "package-hls", "preview", "probe", "rendition", "segment", "subtitles",
          "thumbnail", "transcode", "watermark")
"""Stage functions (``shared.recipes.STAGES``); each consumes ``stages.<stage>`` with the
durable ``stage-<stage>`` and its bulk lane ``stages.<stage>.bulk`` with ``stage-<stage>-bulk``
(fair share: ``shared.fairshare``)."""


@dataclass(frozen=True)
class User:
    name: str
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    consumers: tuple[tuple[str, str], ...] = ()
    """(stream, durable) pairs this user creates and pulls from."""
    kv: tuple[str, ...] = ()
    runtime: bool = True
    """A jetcut function: provisions the streams and the jobs KV at start-up."""
    deny_publish: tuple[str, ...] = field(default=())
    responds: bool = False
    """Answers requests: may publish to the reply subject of a message it received, and only
    once (``allow_responses``), rather than to all of ``_INBOX.>``."""

    def allow_publish(self) -> list[str]:
        subjects = list(self.publish)
        if self.runtime:
            subjects += ["$JS.API.INFO"]
            for verb in ("CREATE", "UPDATE", "INFO"):
                subjects += [f"$JS.API.STREAM.{verb}.{s}" for s in STREAMS]
        for stream, durable in self.consumers:
            subjects += [
                f"$JS.API.CONSUMER.CREATE.{stream}.{durable}",
                f"$JS.API.CONSUMER.CREATE.{stream}.{durable}.>",
                f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{durable}",
                f"$JS.API.CONSUMER.INFO.{stream}.{durable}",
                f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
                f"$JS.ACK.{stream}.{durable}.>",
            ]
        for bucket in self.kv:
            # Puts/deletes are publishes on $KV.<bucket>.<key>; gets are direct gets; watches
            # and key listings are ephemeral ordered consumers (flow control on $JS.FC).
            subjects += [
                f"$KV.{bucket}.>",
                f"$JS.API.STREAM.CREATE.KV_{bucket}",
                f"$JS.API.STREAM.INFO.KV_{bucket}",
                f"$JS.API.DIRECT.GET.KV_{bucket}",
                f"$JS.API.DIRECT.GET.KV_{bucket}.>",
                f"$JS.API.STREAM.MSG.GET.KV_{bucket}",
                f"$JS.API.CONSUMER.CREATE.KV_{bucket}",
                f"$JS.API.CONSUMER.CREATE.KV_{bucket}.>",
                f"$JS.API.CONSUMER.DELETE.KV_{bucket}.>",
                f"$JS.API.CONSUMER.INFO.KV_{bucket}.>",
            ]
        if self.kv:
            subjects.append("$JS.FC.>")
        return list(dict.fromkeys(subjects))

    def allow_subscribe(self) -> list[str]:
        return ["_INBOX.>", *self.subscribe]


def stage(name: str) -> User:
    return User(
        name=name, publish=("jobs.stage.complete", "events.>", f"dlq.{name}"),
        subscribe=("jobs.cancel",),
        consumers=(("STAGES", f"stage-{name}"), ("STAGES", f"stage-{name}-bulk")), kv=("jobs",),
    )


USERS: tuple[User, ...] = (
    User(name="gateway",
         # The HTTP API reads every stream and consumer (queue depth, positions, status),
         # replays DLQ entries onto their original subjects and runs SSE consumers: the
         # JetStream API is open to it except deleting streams.
         publish=("jobs.>", "stages.>", "dlq.>", "$JS.API.>", "$KV.jobs.>", "$KV.keys.>",
                  "$KV.active.>", "$KV.costs.>", "$JS.FC.>"),
         deny_publish=("$JS.API.STREAM.DELETE.>",),
         kv=("jobs", "keys", "active", "costs")),
    User(name="conductor",
         publish=("stages.>", "events.>", "jobs.cleanup", "dlq.conductor"),
         consumers=tuple(("JOBS", f"conductor-{h}")
                         for h in ("submit", "complete", "cancel", "retry")),
         kv=("jobs", "costs")),
    User(name="calibrate",
         publish=("dlq.calibrate",),
         consumers=(("JOBS", "calibrate"),), kv=("jobs", "costs")),
    User(name="ingest",
         publish=("jobs.submit", "dlq.ingest"),
         subscribe=("ingest.request",),
         consumers=(("INGEST", "ingest-minio"),), kv=("jobs",), responds=True),
    User(name="janitor",
         # jobs.submit: the jobs of ingest objects whose notification was lost.
         publish=("jobs.submit", "jobs.retry", "jobs.cleanup", "events.>", "dlq.janitor",
                  "$JS.API.STREAM.INFO.>", "$JS.API.CONSUMER.INFO.>"),
         consumers=(("JOBS", "janitor-cleanup"),), kv=("jobs",)),
    User(name="deadletter",
         publish=("dlq.>", "jobs.stage.complete", "$JS.API.STREAM.MSG.GET.STAGES",
                  "$JS.API.STREAM.MSG.GET.JOBS", "$JS.API.STREAM.MSG.DELETE.STAGES"),
         consumers=(("ADVISORIES", "deadletter-stages"), ("ADVISORIES", "deadletter-jobs")),
         kv=("jobs",)),
    User(name="notify",
         publish=("dlq.notify",),
         consumers=(("EVENTS", "notify-events"),), kv=("jobs",)),
    *(stage(name) for name in STAGES),
    # Not jetcut functions: MinIO's notification target, and other services that submit.
    User(name="minio", publish=("ingest.minio",), runtime=False),
    User(name="service", publish=("ingest.request", "jobs.submit"), runtime=False),
)


def env_var(user: str) -> str:
    return "NATS_PASSWORD_" + user.upper().replace("-", "_")


def _list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


def render_conf() -> str:
    lines = [
        "# GENERATED by infra/nats/auth/render.py: edit the table there, then run it.",
        "#",
        "# nats-server with per-function users (docker compose -f docker-compose.yml",
        "# -f infra/nats/auth/compose.yml up). Every user's password comes from this",
        "# server's environment (NATS_PASSWORD_<USER>); the function gets the same value as",
        "# JETCUT_NATS_USER / JETCUT_NATS_PASSWORD. Check: nats-server -t -c <this file>.",
        "",
        "server_name: jetcut-nats",
        "port: 4222",
        "http_port: 8222",
        "max_payload: 8MB",
        "lame_duck_duration: 30s",
        "lame_duck_grace_period: 10s",
        "",
        "jetstream {",
        "  store_dir: /data/jetstream",
        "  # fsync before every PubAck (see infra/nats/nats-server.conf for why).",
        "  sync_interval: always",
        "  max_file_store: 20GB",
        "  max_memory_store: 256MB",
        "}",
        "",
        "system_account: SYS",
        "",
        "accounts {",
        "  SYS {",
        "    users: [{user: sys, password: $NATS_PASSWORD_SYS}]",
        "  }",
        "  JETCUT {",
        "    jetstream: enabled",
        "    users: [",
    ]
    for user in USERS:
        publish = f"allow: {_list(user.allow_publish())}"
        if user.deny_publish:
            publish += f", deny: {_list(list(user.deny_publish))}"
        lines += [
            f"      {{user: {user.name}, password: ${env_var(user.name)}, permissions: {{",
            f"        publish: {{{publish}}}",
            f"        subscribe: {{allow: {_list(user.allow_subscribe())}}}",
            *(["        allow_responses: true"] if user.responds else []),
            "      }}",
        ]
    lines += ["    ]", "  }", "}", ""]
    return "\n".join(lines)


def render_compose() -> str:
    lines = [
        "# GENERATED by infra/nats/auth/render.py. NATS with per-function users:",
        "#",
        "#   docker compose -f docker-compose.yml -f infra/nats/auth/compose.yml up --build",
        "#",
        "# Set every NATS_PASSWORD_* (an .env file beside docker-compose.yml); the defaults",
        "# below are for a laptop only.",
        "services:",
        "  nats:",
        '    command: ["nats-server", "--config", "/etc/nats/auth.conf"]',
        "    volumes:",
        "      - ./infra/nats/auth/nats-server.conf:/etc/nats/auth.conf:ro",
        "    environment:",
        "      NATS_PASSWORD_SYS: ${NATS_PASSWORD_SYS:-sys-dev}",
    ]
    for user in USERS:
        var = env_var(user.name)
        lines.append(f"      {var}: ${{{var}:-{user.name}-dev}}")
    lines += [
        "  minio:",
        "    environment:",
        "      MINIO_NOTIFY_NATS_USERNAME_JETCUT: minio",
        "      MINIO_NOTIFY_NATS_PASSWORD_JETCUT: ${NATS_PASSWORD_MINIO:-minio-dev}",
    ]
    # Only services the base file defines: an override cannot add half a service.
    services = set(re.findall(r"^  ([a-z][a-z0-9-]*):\s*(?:#.*)?$",
                              (HERE.parents[2] / "docker-compose.yml").read_text(), re.M))
    for user in (u for u in USERS if u.runtime and u.name in services):
        service = user.name
        var = env_var(user.name)
        lines += [
            f"  {service}:",
            "    environment:",
            f"      JETCUT_NATS_USER: {user.name}",
            f"      JETCUT_NATS_PASSWORD: ${{{var}:-{user.name}-dev}}",
        ]
    return "\n".join(lines) + "\n"


OUTPUTS = {"nats-server.conf": render_conf, "compose.yml": render_compose}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the files are stale")
    args = parser.parse_args()
    stale = []
    for name, render in OUTPUTS.items():
        path, text = HERE / name, render()
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)}; run infra/nats/auth/render.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
