"""``jetcut`` — run the stack, run one function, submit and watch jobs, write schemas."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

from shared.settings import Settings, SettingsError, load_settings

log = logging.getLogger("jetcut")


def _setup_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)


DEV_DRAIN_GRACE_S = 5.0
"""``jetcut dev``'s drain grace unless JETCUT_DRAIN_GRACE_S is set: short enough that a
Ctrl-C stops the stack within 10 s, with in-flight work handed back for the next start."""


def cmd_dev(settings: Settings, args: argparse.Namespace) -> int:
    """Embedded stack: a real nats-server, the local store, every function, the gateway."""
    from functions.registry import FUNCTIONS
    from shared.natsserver import NatsServer
    from shared.ports import PortInUse, ensure_free
    from shared.runtime import Runtime

    data_dir = Path(settings.data_dir).resolve()
    server = NatsServer(data_dir / "nats", port=settings.nats_port, binary=settings.nats_server_bin)
    # Ctrl-C while the server starts: nothing to drain yet, stop it and go.
    _on_signals(lambda: _force_exit(None, server, "stopped while starting"))
    try:
        server.stop_leftover()  # ours from an earlier run: its ports are not "in use"
        ensure_free(server.host, server.port, setting="JETCUT_NATS_PORT", what="NATS")
        ensure_free(settings.http_host, settings.http_port, setting="JETCUT_HTTP_PORT",
                    what="HTTP gateway")
        server.start()
    except PortInUse as exc:
        print(f"jetcut: {exc}", file=sys.stderr, flush=True)
        return 2
    except (RuntimeError, TimeoutError) as exc:
        server.stop()
        print(f"jetcut: nats-server did not start: {exc}", file=sys.stderr, flush=True)
        return 1
    # A local stack for one person: callers without an API key are the default tenant
    # (admin), unless JETCUT_ALLOW_ANONYMOUS=false asks for keys even here.
    defaults: dict[str, object] = {}
    if "JETCUT_ALLOW_ANONYMOUS" not in os.environ:
        defaults["allow_anonymous"] = True
    if "JETCUT_DRAIN_GRACE_S" not in os.environ:
        defaults["drain_grace_s"] = DEV_DRAIN_GRACE_S
    settings = load_settings(None, nats_url=server.url, data_dir=str(data_dir), **defaults)
    auth = (f"anonymous access ON: no key needed, every caller is tenant "
            f"{settings.default_tenant!r} with admin rights (development only)"
            if settings.allow_anonymous else
            "API keys required (create one: jetcut keys create --tenant NAME)")

    def ready(_: object) -> None:
        print(
            f"jetcut dev is running\n"
            f"  gateway   {settings.base_url}   (try: curl {settings.base_url}/healthz)\n"
            f"  auth      {auth}\n"
            f"  metrics   {settings.base_url}/metrics\n"
            f"  nats      {server.url}   (JetStream files in {server.data_dir})\n"
            f"  store     {Path(settings.store_root).resolve()}\n"
            f"  functions {', '.join(FUNCTIONS)}\n"
            f"Press Ctrl-C to stop (a second Ctrl-C stops at once).",
            flush=True,
        )

    runtime = Runtime(settings, list(FUNCTIONS.values()), service_name="dev")
    force = partial(_force_exit, runtime, server, "stopped at once (second signal)")
    try:
        asyncio.run(runtime.serve_until_signalled(on_ready=ready, on_force=force))
    finally:
        _on_signals(force)  # the runtime is done with signals; one more forces the rest
        server.stop()
        print("jetcut dev stopped", flush=True)
    return _exit_code(runtime)


def _on_signals(handler: Callable[[], None]) -> None:
    """Call ``handler`` on SIGINT/SIGTERM (outside the event loop, which has its own)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: handler())


def _force_exit(runtime: Any, server: Any, why: str) -> NoReturn:
    """Exit now, without draining, but leave no child behind: ffmpeg's process groups and
    the nats-server are killed first (on Linux the kernel would kill them too, see
    shared/children.py; elsewhere this is what stops them)."""
    pids = runtime.services.media.child_pids() if runtime and runtime.services else ()
    for pid in pids:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
    if server is not None and server.pid is not None:
        # A bare kill, no wait(): this may run inside a wait() on the same process.
        with contextlib.suppress(OSError):
            os.kill(server.pid, signal.SIGKILL)
    print(f"jetcut: {why}", file=sys.stderr, flush=True)
    os._exit(130)


def _exit_code(runtime: Any) -> int:
    """Non-zero when a loop crashed, so a supervisor sees the failure and restarts us."""
    if runtime.crashed:
        print(f"jetcut: stopped because {', '.join(runtime.crashed)} crashed", file=sys.stderr)
        return 1
    return 0


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    """One function per process, as deployments run it."""
    from functions.registry import FUNCTIONS
    from shared.runtime import Runtime

    if args.list or args.function is None:
        for name, function in FUNCTIONS.items():
            summary = function.doc.strip().splitlines()[0] if function.doc.strip() else ""
            print(f"{name:14} {summary}")
        return 0 if args.list else 2
    fn = FUNCTIONS.get(args.function)
    if fn is None:
        print(f"unknown function {args.function!r}; known: {', '.join(FUNCTIONS)}",
              file=sys.stderr)
        return 2
    from shared.ports import PortInUse, ensure_free

    try:
        if fn.name == "gateway":
            ensure_free(settings.http_host, settings.http_port, setting="JETCUT_HTTP_PORT",
                        what="HTTP gateway")
        ensure_free(settings.http_host, settings.metrics_port, setting="JETCUT_METRICS_PORT",
                    what="metrics")
    except PortInUse as exc:
        print(f"jetcut: {exc}", file=sys.stderr, flush=True)
        return 2
    runtime = Runtime(settings, [fn], service_name=fn.name)

    def ready(_: object) -> None:
        if settings.metrics_port:
            runtime.telemetry.start_metrics_server(settings.http_host, settings.metrics_port)
        log.info("%s ready (nats %s)", fn.name, settings.nats_url)

    force = partial(_force_exit, runtime, None, "stopped at once (second signal)")
    asyncio.run(runtime.serve_until_signalled(on_ready=ready, on_force=force))
    return _exit_code(runtime)


def cmd_schema(settings: Settings, args: argparse.Namespace) -> int:
    from shared.events import json_schemas

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for tag, schema in json_schemas().items():
        path = out / f"{tag}.schema.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        print(path)
    return 0


def _client(args: argparse.Namespace, settings: Settings) -> Any:
    import httpx

    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    return httpx.Client(base_url=args.url or settings.base_url, timeout=httpx.Timeout(30.0),
                        headers=headers)


def _fail(response: Any) -> int:
    try:
        error = response.json()["error"]
        print(f"error {response.status_code} {error['code']}: {error['message']}",
              file=sys.stderr)
    except Exception:
        print(f"error {response.status_code}: {response.text[:500]}", file=sys.stderr)
    return 1


def cmd_submit(settings: Settings, args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        print(f"no such file: {path}", file=sys.stderr)
        return 2
    with _client(args, settings) as client, path.open("rb") as fh:
        r = client.post("/v1/uploads", params={"filename": path.name}, content=fh)
        if r.status_code != 201:
            return _fail(r)
        upload = r.json()
        headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
        params = json.loads(args.params) if args.params else {}
        r = client.post("/v1/jobs", json={"recipe": args.recipe, "input": upload["upload_id"],
                                          "params": params}, headers=headers)
        if r.status_code not in (200, 202):
            return _fail(r)
        job = r.json()
        print(f"job {job['job_id']} accepted ({args.recipe})", flush=True)
        if not args.wait:
            print(f"watch it: jetcut status {job['job_id']}")
            return 0
        return _wait(client, job["job_id"], args.timeout)


def _wait(client: Any, job_id: str, timeout: float,
          superseded: float | None = None) -> int:
    """Show progress until the job finishes. ``superseded``: the ``finished_at`` of an outcome
    that no longer counts (a retried job still shows its old failure until the conductor
    takes the retry), so that outcome is waited past, not reported."""
    from tqdm import tqdm

    deadline = time.monotonic() + timeout
    with tqdm(total=100, unit="%", desc=job_id, bar_format="{desc} {bar} {n:.0f}% {postfix}") \
            as bar:
        while True:
            r = client.get(f"/v1/jobs/{job_id}")
            if r.status_code != 200:
                return _fail(r)
            job = r.json()
            bar.n = round(job["progress"] * 100, 1)
            eta = job.get("eta_s")
            bar.set_postfix_str(job["status"] + (f", ~{eta:.0f}s left" if eta else ""))
            if job["status"] in ("succeeded", "failed", "cancelled") and (
                    superseded is None or job["finished_at"] != superseded):
                break
            if time.monotonic() > deadline:
                print(f"\ngave up waiting after {timeout:.0f}s", file=sys.stderr)
                return 1
            time.sleep(0.5)
    if job["status"] != "succeeded":
        error = job.get("error") or {}
        print(f"job {job['status']}: {error.get('code')}: {error.get('message')}",
              file=sys.stderr)
        return 1
    outputs = client.get(f"/v1/jobs/{job_id}/outputs").json()["outputs"]
    for out in outputs:
        print(f"{out['step']}/{out['name']}: {out['url']}")
    return 0


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    with _client(args, settings) as client:
        r = client.get(f"/v1/jobs/{args.job_id}")
        if r.status_code != 200:
            return _fail(r)
        print(json.dumps(r.json(), indent=2))
    return 0


def cmd_cancel(settings: Settings, args: argparse.Namespace) -> int:
    with _client(args, settings) as client:
        r = client.delete(f"/v1/jobs/{args.job_id}")
        if r.status_code != 202:
            return _fail(r)
        print(f"job {args.job_id} cancelling")
    return 0


def cmd_retry(settings: Settings, args: argparse.Namespace) -> int:
    """Run a failed or cancelled job again from its checkpoints."""
    try:
        changes = _retry_changes(args)
    except ValueError as exc:
        print(f"jetcut retry: {exc}", file=sys.stderr)
        return 2
    with _client(args, settings) as client:
        r = client.post(f"/v1/jobs/{args.job_id}:retry", json=changes)
        if r.status_code != 202:
            return _fail(r)
        print(f"job {args.job_id} retrying (it was {r.json()['status']})", flush=True)
        if not args.wait:
            return 0
        return _wait(client, args.job_id, args.timeout, superseded=r.json()["finished_at"])


def _retry_changes(args: argparse.Namespace) -> dict[str, Any] | None:
    """The retry's body from ``--params`` / ``--recipe`` / ``--steps`` (None: no change).

    Raises:
        ValueError: a value that is not the JSON object it should be.
    """
    changes: dict[str, Any] = {}
    if args.params is not None:
        changes["params"] = _json_object(args.params, "--params")
    if args.recipe is not None:
        changes["recipe"] = args.recipe
    if args.steps is not None:
        changes["steps"] = _json_object(Path(args.steps).read_text(), "--steps")
    return changes or None


def _json_object(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{what} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object")
    return value


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def cmd_dlq(settings: Settings, args: argparse.Namespace) -> int:
    """Inspect and act on dead letters through the gateway (admin)."""
    with _client(args, settings) as client:
        if args.dlq_command == "list":
            params: dict[str, Any] = {"after": args.after, "limit": args.limit}
            if args.function:
                params["function"] = args.function
            r = client.get("/v1/dlq", params=params)
            if r.status_code != 200:
                return _fail(r)
            page = r.json()
            for e in page["entries"]:
                print(f"{e['seq']:>8}  {_when(e['at'])}  {e['function']:14} "
                      f"{e['error']['code']:18} {e['job_id'] or '-':28} "
                      f"x{e['num_delivered']}  {e['subject']}")
            if not page["entries"]:
                print("the DLQ is empty" + (f" for {args.function}" if args.function else ""))
            if page["next_after"] is not None:
                print(f"more: jetcut dlq list --after {page['next_after']}")
            return 0
        if args.dlq_command == "groups":
            return _dlq_groups(client)
        if args.dlq_command == "replay" and not args.seq.isdigit():
            return _dlq_replay_group(client, args.seq)
        if args.dlq_command == "show":
            r = client.get(f"/v1/dlq/{args.seq}")
        elif args.dlq_command == "replay":
            r = client.post(f"/v1/dlq/{args.seq}:replay")
        elif args.seq is not None:
            r = client.delete(f"/v1/dlq/{args.seq}")
        elif args.function or args.all:
            r = client.delete("/v1/dlq", params={"function": args.function} if args.function
                              else {"all": "true"})
        else:
            print("jetcut dlq purge: give an entry's seq, --function NAME, or --all",
                  file=sys.stderr)
            return 2
        if r.status_code != 200:
            return _fail(r)
        body = r.json()
        if args.dlq_command == "show":
            print(json.dumps(body, indent=2))
        elif args.dlq_command == "replay":
            print(body["message"])
        else:
            print(f"purged {body['purged']} entr{'y' if body['purged'] == 1 else 'ies'}")
    return 0


def _dlq_groups(client: Any) -> int:
    """One line per group (largest first), then its shape and example, indented."""
    r = client.get("/v1/dlq/groups")
    if r.status_code != 200:
        return _fail(r)
    body = r.json()
    for g in body["groups"]:
        print(f"{g['group']:48} x{g['count']:<5} jobs {g['jobs']:<5} "
              f"{_when(g['first_seen'])} .. {_when(g['last_seen'])}")
        print(f"    {g['shape']}")
        example = g["example"]
        print(f"    e.g. seq {example['seq']}  {example['job_id'] or '-'}  "
              f"{example['subject']}")
    if not body["groups"]:
        print("the DLQ is empty")
    return 0


def _dlq_replay_group(client: Any, group: str) -> int:
    r = client.post(f"/v1/dlq/groups/{group}:replay")
    if r.status_code != 200:
        return _fail(r)
    body = r.json()
    print(f"group {body['group']}: replayed {body['replayed']}, covered {body['covered']} "
          f"(same job), kept {body['kept']}")
    for item in body["items"]:
        if item["outcome"] == "conflict":
            print(f"  kept seq {item['seq']}: {item['message']}")
    return 0


def cmd_keys(settings: Settings, args: argparse.Namespace) -> int:
    """Manage API keys in the ``keys`` KV bucket, straight through NATS."""
    return asyncio.run(_keys(settings, args))


async def _keys(settings: Settings, args: argparse.Namespace) -> int:
    from shared.bus import connect
    from shared.keys import KeyStore
    from shared.subjects import Names

    nc = await connect(settings, name="jetcut-keys")
    try:
        store = await KeyStore.open(nc.jetstream(), Names(settings.namespace), settings)
        if args.keys_command == "create":
            try:
                key, record = await store.create(args.tenant, name=args.name,
                                                 admin=args.admin)
            except ValueError as exc:
                print(f"jetcut keys: {exc}", file=sys.stderr)
                return 2
            print(key, flush=True)
            print(f"key {record.key_id} for tenant {record.tenant!r}"
                  f"{' (admin)' if record.admin else ''} created; the key above is shown "
                  "only this once: send it as 'Authorization: Bearer <key>'", file=sys.stderr)
            return 0
        if args.keys_command == "list":
            records = [r for r in await store.list()
                       if args.tenant is None or r.tenant == args.tenant]
            for r in records:
                state = f"revoked {_when(r.revoked_at)}" if r.revoked_at else "active"
                print(f"{r.key_id}  {r.tenant:20} {'admin' if r.admin else '-':5}  "
                      f"{_when(r.created_at)}  {state:27}  {r.name}")
            if not records:
                print("no API keys" + (f" for tenant {args.tenant!r}" if args.tenant else ""))
            return 0
        revoked = await store.revoke(args.key_id)
        if revoked is None:
            print(f"jetcut keys: no key {args.key_id!r}", file=sys.stderr)
            return 1
        print(f"key {revoked.key_id} (tenant {revoked.tenant!r}) revoked")
        return 0
    finally:
        await nc.close()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jetcut", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("dev", help="run the embedded stack (nats-server, all functions, gateway)")
    run = sub.add_parser("run", help="run one function (as a deployment does)")
    run.add_argument("function", help="which function; `jetcut run --list` shows them",
                     nargs="?")
    run.add_argument("--list", action="store_true", help="list the functions and exit")
    schema = sub.add_parser("schema", help="write JSON Schemas of the bus events")
    schema.add_argument("--out", default="shared/schemas")
    submit = sub.add_parser("submit", help="upload a file and submit a job")
    submit.add_argument("file")
    submit.add_argument("--recipe", default="web")
    submit.add_argument("--params", help="recipe params as JSON, e.g. '{\"max_height\": 480}'")
    submit.add_argument("--idempotency-key")
    submit.add_argument("--wait", action="store_true", help="show progress until done")
    submit.add_argument("--timeout", type=float, default=3600.0)
    submit.add_argument("--url", help="gateway URL (default: JETCUT_PUBLIC_URL or "
                                      "http://JETCUT_HTTP_HOST:JETCUT_HTTP_PORT)")
    status = sub.add_parser("status", help="show a job")
    status.add_argument("job_id")
    status.add_argument("--url")
    cancel = sub.add_parser("cancel", help="cancel a queued or running job")
    cancel.add_argument("job_id")
    cancel.add_argument("--url")
    retry = sub.add_parser("retry", help="run a failed or cancelled job again from its "
                                         "checkpoints")
    retry.add_argument("job_id")
    retry.add_argument("--wait", action="store_true", help="show progress until done")
    retry.add_argument("--timeout", type=float, default=3600.0)
    retry.add_argument("--params", help="re-plan with these params (a JSON object that "
                                        "replaces the job's)")
    retry.add_argument("--recipe", help="re-plan with this recipe")
    retry.add_argument("--steps", help="re-plan with the inline steps in this JSON file")
    retry.add_argument("--url")
    dlq = sub.add_parser("dlq", help="list, show, replay or purge dead letters (admin)")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    dlq_list = dlq_sub.add_parser("list", help="entries, oldest first")
    dlq_list.add_argument("--function", help="only this function's entries")
    dlq_list.add_argument("--after", type=int, default=0, help="entries after this seq")
    dlq_list.add_argument("--limit", type=int, default=50)
    dlq_show = dlq_sub.add_parser("show", help="one entry with its original message")
    dlq_show.add_argument("seq", type=int)
    dlq_replay = dlq_sub.add_parser("replay", help="retry the entry's job (stage tasks) or "
                                                   "re-publish it, and remove it")
    dlq_replay.add_argument("seq", metavar="SEQ|GROUP",
                            help="an entry's seq, or a group id (jetcut dlq groups): "
                                 "every entry of the group")
    dlq_groups = dlq_sub.add_parser("groups", help="entries grouped by function, error "
                                    "code and message shape, largest group first")
    dlq_purge = dlq_sub.add_parser("purge", help="delete one entry, a function's, or all")
    dlq_purge.add_argument("seq", type=int, nargs="?")
    dlq_purge.add_argument("--function")
    dlq_purge.add_argument("--all", action="store_true", help="every entry")
    for command in (dlq_list, dlq_show, dlq_replay, dlq_purge, dlq_groups):
        command.add_argument("--url")
    keys = sub.add_parser("keys", help="create, list or revoke API keys (talks to NATS "
                                       "directly: an operator tool)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    keys_create = keys_sub.add_parser("create", help="mint a key for a tenant; it is printed "
                                                     "once and never stored")
    keys_create.add_argument("--tenant", required=True)
    keys_create.add_argument("--name", default="", help="a label: who or what uses it")
    keys_create.add_argument("--admin", action="store_true",
                             help="may also use the admin endpoints (dead letters)")
    keys_list = keys_sub.add_parser("list", help="every key, without secrets")
    keys_list.add_argument("--tenant", help="only this tenant's keys")
    keys_revoke = keys_sub.add_parser("revoke", help="revoke a key (at once, for good)")
    keys_revoke.add_argument("key_id")
    return p


COMMANDS = {"dev": cmd_dev, "run": cmd_run, "schema": cmd_schema, "submit": cmd_submit,
            "status": cmd_status, "cancel": cmd_cancel, "retry": cmd_retry, "dlq": cmd_dlq,
            "keys": cmd_keys}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"jetcut: {exc}", file=sys.stderr)
        return 2
    _setup_logging(settings)
    return COMMANDS[args.command](settings, args)


if __name__ == "__main__":
    sys.exit(main())
