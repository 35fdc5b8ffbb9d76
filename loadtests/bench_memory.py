"""Memory: a 2 GiB upload and download through the gateway must not grow it by 100 MB.

The gateway runs as its own OS process (``jetcut run gateway``, configured only by
``JETCUT_*`` variables, as deployments run it) against a nats-server started here, with the
local-directory store. The client streams the upload from disk (httpx, a generator body) and
streams the download into a SHA-256 sink; both digests must equal the file's.

Peak memory comes from ``/proc/<pid>/status`` of the gateway: ``VmHWM`` is reset (via
``/proc/<pid>/clear_refs``) at the start of each transfer where the kernel allows it, and
``VmRSS`` is also sampled every 20 ms; growth = peak - RSS just before the transfer.

The gateway has no route that serves an upload back, so the download goes through the
job-outputs route: the benchmark writes a synthetic, already-succeeded job record into the
jobs KV bucket whose one output is the uploaded key. No job runs; the bytes are the upload's.

Throughput is set beside ``cp`` of the same file on the same disk. Every file is removed
afterwards (source, copy, the stored object, the gateway's spool).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats

from loadtests.common import VENV_BIN, BenchResult, Row, nats_server, say, temp_dir
from shared.ids import new_job_id
from shared.jobstate import JobRecord, JobStatus, StepState, StepStatus
from shared.jobstore import JobStore
from shared.natsserver import free_port
from shared.subjects import Names

NAME = "memory"
MIB = 1 << 20
NAMESPACE = "benchmem"
TRANSFER_LIMIT_S = 300.0
TARGET_MB = 100.0


def make_file(path: Path, size: int) -> str:
    """``size`` bytes of incompressible-looking data, fast: 16 random MiB blocks in turn."""
    blocks = [os.urandom(MIB) for _ in range(16)]
    digest = hashlib.sha256()
    with path.open("wb") as fh:
        written = 0
        for block in itertools.cycle(blocks):
            if written >= size:
                break
            chunk = block[: size - written]
            fh.write(chunk)
            digest.update(chunk)
            written += len(chunk)
    return digest.hexdigest()


def status_kb(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_hwm(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, needs ptrace rights over ``pid``)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class Sampler:
    """Samples the gateway's VmRSS in a thread while a transfer runs."""

    def __init__(self, pid: int, every_s: float = 0.02) -> None:
        self.pid = pid
        self.every_s = every_s
        self.peak_kb = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.peak_kb = max(self.peak_kb, status_kb(self.pid)["VmRSS"])
                self.samples += 1
            self._stop.wait(self.every_s)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measured(pid: int, label: str, fn: Any) -> dict[str, Any]:
    """Run ``fn`` (one transfer) and report the gateway's memory and CPU around it."""
    before = status_kb(pid)
    did_reset = reset_hwm(pid)
    if did_reset:
        before = status_kb(pid)
    cpu_before = cpu_s(pid)
    with Sampler(pid) as sampler:
        started = time.perf_counter()
        detail = fn()
        elapsed = time.perf_counter() - started
    after = status_kb(pid)
    peak_kb = max(sampler.peak_kb, after["VmHWM"] if did_reset else 0)
    growth_mb = (peak_kb - before["VmRSS"]) / 1024
    say(f"  {label}: {elapsed:.2f}s, gateway peak RSS +{growth_mb:.1f} MB "
        f"(VmHWM reset: {did_reset}, {sampler.samples} samples)")
    return {
        **detail, "elapsed_s": elapsed, "rss_before_kb": before["VmRSS"],
        "hwm_before_kb": before["VmHWM"], "hwm_after_kb": after["VmHWM"],
        "rss_after_kb": after["VmRSS"], "sampled_peak_rss_kb": sampler.peak_kb,
        "hwm_reset": did_reset, "peak_growth_mb": growth_mb,
        "gateway_cpu_s": cpu_s(pid) - cpu_before,
    }


def upload(base: str, path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()

    def body() -> Iterator[bytes]:
        with path.open("rb") as fh:
            while chunk := fh.read(MIB):
                digest.update(chunk)
                yield chunk

    with httpx.Client(base_url=base, timeout=httpx.Timeout(TRANSFER_LIMIT_S)) as client:
        r = client.post("/v1/uploads", params={"filename": path.name}, content=body())
    if r.status_code != 201:
        raise RuntimeError(f"upload failed: {r.status_code} {r.text[:300]}")
    data = r.json()
    return {"key": data["key"], "size": data["size"], "server_sha256": data["sha256"],
            "client_sha256": digest.hexdigest()}


def download(base: str, url: str) -> dict[str, Any]:
    digest = hashlib.sha256()
    size = 0
    with httpx.Client(base_url=base, timeout=httpx.Timeout(TRANSFER_LIMIT_S)) as client, \
            client.stream("GET", url) as resp:
        if resp.status_code != 200:
            resp.read()
            raise RuntimeError(f"download failed: {resp.status_code} {resp.text[:300]}")
        for chunk in resp.iter_bytes(MIB):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


async def register_output(nats_url: str, key: str) -> str:
    """A succeeded job record whose one output is ``key``: the gateway's download route."""
    nc = await nats.connect(nats_url, name="bench-memory")
    try:
        kv = await nc.jetstream().key_value(Names(NAMESPACE).jobs_bucket)
        job_id = new_job_id()
        now = time.time()
        record = JobRecord(
            job_id=job_id, tenant="default", recipe=None, status=JobStatus.SUCCEEDED,
            created_at=now, started_at=now, finished_at=now,
            steps={"upload": StepState(stage="noop", status=StepStatus.DONE, attempt=1,
                                       outputs={"file": key}, started_at=now, finished_at=now)},
        )
        if not await JobStore(kv).create(record):
            raise RuntimeError("could not create the synthetic job record")
        return job_id
    finally:
        await nc.drain()


def timed_cp(src: Path, dst: Path, *, fsync: bool) -> float:
    started = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    if fsync:
        subprocess.run(["sync", str(dst)], check=True)
    elapsed = time.perf_counter() - started
    dst.unlink()
    return elapsed


@contextlib.contextmanager
def gateway(nats_url: str, work: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETCUT_")}
    for sub in ("data", "store", "work"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    env.update({
        "JETCUT_NATS_URL": nats_url, "JETCUT_NAMESPACE": NAMESPACE, "JETCUT_STORE": "local",
        "JETCUT_STORE_DIR": str(work / "store"), "JETCUT_DATA_DIR": str(work / "data"),
        "JETCUT_WORK_DIR": str(work / "work"), "JETCUT_HTTP_HOST": "127.0.0.1",
        "JETCUT_HTTP_PORT": str(port), "JETCUT_LOG_LEVEL": "WARNING",
        "JETCUT_ALLOW_ANONYMOUS": "true",
    })
    log = (work / "gateway.log").open("wb")
    proc = subprocess.Popen([str(VENV_BIN / "jetcut"), "run", "gateway"], env=env,
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start; see {work / 'gateway.log'}: "
                                   + (work / "gateway.log").read_text()[-500:])
            time.sleep(0.1)
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def run(*, quick: bool) -> BenchResult:
    size = (256 if quick else 2048) * MIB
    result = BenchResult(name=NAME)
    result.raw["bytes"] = size
    with temp_dir("memory") as work, nats_server(work / "nats") as server:
        src = work / "big.bin"
        say(f"memory: writing a {size / MIB:.0f} MiB source file")
        t = time.perf_counter()
        sha = make_file(src, size)
        result.raw["make_file_s"] = time.perf_counter() - t
        with gateway(server.url, work / "gw") as (proc, base):
            pid = proc.pid
            # Warm-up: first request paths (imports, first store write, KV bucket open).
            small = work / "small.bin"
            make_file(small, MIB)
            warm = upload(base, small)
            warm_job = asyncio.run(register_output(server.url, warm["key"]))
            download(base, f"/v1/jobs/{warm_job}/outputs/upload/file")
            small.unlink()
            baseline = status_kb(pid)
            result.raw["gateway_baseline_kb"] = baseline
            say(f"memory: gateway pid {pid} baseline VmRSS {baseline['VmRSS'] / 1024:.1f} MB, "
                f"VmHWM {baseline['VmHWM'] / 1024:.1f} MB")
            up = measured(pid, "upload", lambda: upload(base, src))
            job_id = asyncio.run(register_output(server.url, up["key"]))
            down = measured(pid, "download",
                            lambda: download(base, f"/v1/jobs/{job_id}/outputs/upload/file"))
            final = status_kb(pid)
        say("memory: cp of the same file (page cache, then with fsync)")
        cp_s = timed_cp(src, work / "copy.bin", fsync=False)
        cp_sync_s = timed_cp(src, work / "copy.bin", fsync=True)
        src.unlink()
    ok = up["client_sha256"] == up["server_sha256"] == down["sha256"] == sha \
        and up["size"] == down["size"] == size
    mb = size / 1e6
    result.raw.update({"upload": up, "download": down, "final_kb": final, "cp_s": cp_s,
                       "cp_fsync_s": cp_sync_s, "sha256": sha, "digests_match": ok})
    growth = max(up["peak_growth_mb"], down["peak_growth_mb"])
    hwm_growth = (final["VmHWM"] - baseline["VmHWM"]) / 1024
    label = f"{size / MIB / 1024:g} GiB" if size >= 1024 * MIB else f"{size / MIB:.0f} MiB"
    result.rows += [
        Row(benchmark=NAME, metric=f"gateway peak RSS growth, {label} up + down",
            unit="MB", jetcut=growth, target_op="<", target=TARGET_MB, target_on="value",
            note="" if ok else "DIGEST MISMATCH"),
        Row(benchmark=NAME, metric=f"upload throughput, {label}", unit="MB/s",
            jetcut=mb / up["elapsed_s"], peer_name="cp (same disk)", peer=mb / cp_s),
        Row(benchmark=NAME, metric=f"download throughput, {label}", unit="MB/s",
            jetcut=mb / down["elapsed_s"], peer_name="cp (same disk)", peer=mb / cp_s),
    ]
    if not ok:
        result.error = "digest mismatch: the bytes that came back are not the bytes sent"
    result.notes += [
        f"Peak growth: upload +{up['peak_growth_mb']:.1f} MB, download "
        f"+{down['peak_growth_mb']:.1f} MB over the RSS just before each; VmHWM over the whole "
        f"run went {baseline['VmHWM'] / 1024:.1f} -> {final['VmHWM'] / 1024:.1f} MB "
        f"(+{hwm_growth:.1f} MB; baseline taken after a 1 MiB warm-up transfer).",
        f"SHA-256 of file, upload (client and server) and download: "
        f"{'all equal' if ok else 'MISMATCH'}.",
        f"Gateway CPU: upload {up['gateway_cpu_s']:.1f}s, download {down['gateway_cpu_s']:.1f}s. "
        f"The upload path spools the body to JETCUT_WORK_DIR, then the local store copies "
        f"the spool into place with an fsync: two full writes against cp's one. cp with an "
        f"fsync of the copy: {mb / cp_sync_s:.0f} MB/s.",
        "Download uses the job-outputs route of a synthetic succeeded job record (the gateway "
        "has no route that serves an upload back); no job runs.",
    ]
    return result
