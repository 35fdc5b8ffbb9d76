"""The functions really are independent: each runs as its own ``jetcut run`` OS process,
sharing nothing but NATS and an S3 API, and the CLI drives a job through them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.natsserver import NatsServer, free_port
from tests.support.media import ffprobe_json
from tests.support.s3 import S3Endpoint, unique_bucket

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

JETCUT = str(Path(sys.executable).parent / "jetcut")
FUNCTIONS = ("conductor", "probe", "transcode", "thumbnail", "gateway")


@pytest.fixture
def fleet(nats_server: NatsServer, s3_server: S3Endpoint, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("JETCUT_")},
        "JETCUT_NATS_URL": nats_server.url,
        "JETCUT_NAMESPACE": f"proc{os.getpid()}",
        "JETCUT_STORE": "s3",
        "JETCUT_S3_ENDPOINT": s3_server.endpoint,
        "JETCUT_S3_ACCESS_KEY": s3_server.access_key,
        "JETCUT_S3_SECRET_KEY": s3_server.secret_key,
        "JETCUT_S3_REGION": s3_server.region,
        "JETCUT_BUCKET": unique_bucket("proc"),
        "JETCUT_HTTP_PORT": str(port),
        "JETCUT_WORK_DIR": str(tmp_path),
        "JETCUT_FETCH_TIMEOUT_S": "0.5",
        "JETCUT_ALLOW_ANONYMOUS": "true",  # HTTP without API keys (tests/test_auth.py has them)
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = {name: open(tmp_path / f"{name}.log", "wb") for name in FUNCTIONS}
    try:
        for name in FUNCTIONS:
            procs[name] = subprocess.Popen([JETCUT, "run", name], env=env, stdout=logs[name],
                                           stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, procs, tmp_path)
        yield url
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        codes = {name: proc.wait(timeout=30) for name, proc in procs.items()}
        assert codes == dict.fromkeys(FUNCTIONS, 0), _logs(tmp_path)  # graceful shutdown
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for fh in logs.values():
            fh.close()


def _logs(tmp_path: Path) -> str:
    return "\n".join(f"--- {n}\n{(tmp_path / f'{n}.log').read_text()[-3000:]}" for n in FUNCTIONS)


def _wait_ready(url: str, procs: dict[str, subprocess.Popen[bytes]], tmp_path: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        dead = [n for n, p in procs.items() if p.poll() is not None]
        assert not dead, f"{dead} exited early\n{_logs(tmp_path)}"
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"gateway not ready\n{_logs(tmp_path)}")


def test_cli_submit_through_separate_processes(fleet: str, clip_3s: Path, binaries,  # type: ignore[no-untyped-def]
                                               tmp_path: Path) -> None:
    result = subprocess.run(
        [JETCUT, "submit", str(clip_3s), "--recipe", "web", "--wait", "--timeout", "120",
         "--url", fleet],
        capture_output=True, text=True, timeout=150,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    urls = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": http" in line)
    assert set(urls) == {"transcode/video", "poster/poster"}

    video = tmp_path / "out.mp4"
    video.write_bytes(httpx.get(urls["transcode/video"], timeout=30).content)
    info = ffprobe_json(binaries, video)
    codecs = sorted(s["codec_name"] for s in info["streams"])
    assert codecs == ["aac", "h264"]
    assert abs(float(info["format"]["duration"]) - 3.0) <= 0.1
