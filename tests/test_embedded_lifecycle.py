"""``jetcut dev`` as a good local citizen, tested as a user meets it: real OS processes.

- SIGKILL mid-job: no process of the stack remains (nats-server, ffmpeg), checked from the
  process table; the next start serves at once and the job still finishes.
- SIGTERM with an open SSE stream and an upload mid-body: the stack exits within 10 s; a
  second signal while stopping exits at once and still leaves no child.
- A port held by another program: exit status 2 and one line naming the port, the holder and
  the setting; a nats-server left by an earlier run of the same data dir is stopped.
- Two stacks with different data dirs and ports run side by side.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.natsserver import NatsServer, free_ports
from tests.support.media import MakeClip
from tests.support.processes import stack_processes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

JETCUT = str(Path(sys.executable).parent / "jetcut")
STOP_WITHIN_S = 10.0


class Dev:
    """One ``jetcut dev`` stack in ``root`` (data dir, work dir, log), on its own ports."""

    def __init__(self, root: Path, *, http_port: int, nats_port: int, **env: str) -> None:
        self.root, self.http_port, self.nats_port = root, http_port, nats_port
        (root / "work").mkdir(parents=True, exist_ok=True)  # the gateway does not make it
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("JETCUT_")},
            "JETCUT_DATA_DIR": str(root / "data"),
            "JETCUT_WORK_DIR": str(root / "work"),
            "JETCUT_HTTP_PORT": str(http_port),
            "JETCUT_NATS_PORT": str(nats_port),
            "JETCUT_MIN_FREE_DISK_MB": "0",
            "JETCUT_MIN_FREE_MEMORY_MB": "0",
            **{f"JETCUT_{k.upper()}": v for k, v in env.items()},
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{http_port}"
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.root / f"dev-{self.starts}.log"

    def log(self) -> str:
        return "\n".join((self.root / f"dev-{n}.log").read_text(errors="replace")[-4000:]
                         for n in range(1, self.starts + 1))

    def start(self) -> subprocess.Popen[bytes]:
        self.starts += 1
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen([JETCUT, "dev"], env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT)
        return self.proc

    def wait_serving(self, timeout: float = 60.0) -> float:
        """Seconds until /healthz answers 200; fails if the process exits first."""
        assert self.proc is not None
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            assert self.proc.poll() is None, f"jetcut dev exited early\n{self.log()}"
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"jetcut dev not serving after {timeout}s\n{self.log()}")

    def children(self) -> dict[int, str]:
        assert self.proc is not None
        return stack_processes(self.root, parent=self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def stacks(tmp_path: Path) -> Iterator[list[Dev]]:
    made: list[Dev] = []
    yield made
    for dev in made:
        dev.stop()
    for dev in made:  # nothing may outlive a test, whatever it did to its stack
        leftover = stack_processes(dev.root)
        for pid in leftover:
            os.kill(pid, signal.SIGKILL)
        assert not leftover, f"left running: {leftover}"


def new_dev(stacks: list[Dev], root: Path, **env: str) -> Dev:
    http_port, nats_port = free_ports(2)
    dev = Dev(root, http_port=http_port, nats_port=nats_port, **env)
    stacks.append(dev)
    return dev


def until(check: object, *, timeout: float, what: str) -> None:
    """Poll ``check()`` until true (the sync twin of tests/support/waiting.eventually)."""
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def submit(dev: Dev, clip: Path) -> str:
    with httpx.Client(base_url=dev.url, timeout=30) as client:
        r = client.post("/v1/uploads", params={"filename": clip.name}, content=clip.read_bytes())
        assert r.status_code == 201, r.text
        r = client.post("/v1/jobs", json={"recipe": "web", "input": r.json()["upload_id"]})
        assert r.status_code == 202, r.text
        job_id: str = r.json()["job_id"]
        return job_id


def gone(pids: dict[int, str]) -> bool:
    """None of ``pids`` is alive (a zombie counts as gone: it holds nothing)."""
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            return False
    return True


def ffmpeg_running(dev: Dev) -> bool:
    return any(Path(c.split(" ", 1)[0]).name == "ffmpeg" for c in dev.children().values())


@pytest.fixture
def long_clip(make_clip: MakeClip) -> Path:
    """Long enough that a transcode is still running when the test acts on the stack."""
    return make_clip("lifecycle-long", duration=40.0, width=1280, height=720)


def test_sigkill_mid_job_leaves_nothing_and_the_next_start_finishes_the_job(
        stacks: list[Dev], tmp_path: Path, long_clip: Path) -> None:
    dev = new_dev(stacks, tmp_path / "a", ack_wait_s="3", ffmpeg_threads="1")
    dev.start()
    dev.wait_serving()
    job_id = submit(dev, long_clip)
    until(lambda: ffmpeg_running(dev), timeout=60, what="ffmpeg to run the transcode")
    children = dev.children()
    assert any("nats-server" in cmd for cmd in children.values()), children

    assert dev.proc is not None
    dev.proc.kill()
    dev.proc.wait()
    until(lambda: gone(children) and not stack_processes(dev.root), timeout=10,
          what=f"every process of the killed stack to be gone: {children}")

    dev.start()
    assert dev.wait_serving(timeout=30) < 30  # the port and data dir are free again
    with httpx.Client(base_url=dev.url, timeout=10) as client:
        def finished() -> bool:
            return client.get(f"/v1/jobs/{job_id}").json()["status"] in (
                "succeeded", "failed", "cancelled")
        until(finished, timeout=180, what=f"job {job_id} to finish after the restart")
        job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job


def test_sigterm_with_an_open_sse_stream_and_an_upload_mid_body_exits_within_10s(
        stacks: list[Dev], tmp_path: Path, long_clip: Path) -> None:
    dev = new_dev(stacks, tmp_path / "a", ffmpeg_threads="1")
    dev.start()
    dev.wait_serving()
    job_id = submit(dev, long_clip)
    host = ("127.0.0.1", dev.http_port)

    sse = socket.create_connection(host, timeout=15)
    sse.sendall(f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert sse.recv(4096).startswith(b"HTTP/1.1 200"), "the SSE stream did not open"
    upload = socket.create_connection(host, timeout=15)
    upload.sendall(b"POST /v1/uploads?filename=big.mp4 HTTP/1.1\r\nHost: x\r\n"
                   b"Content-Length: 1000000000\r\n\r\n" + b"\0" * 256 * 1024)
    until(lambda: ffmpeg_running(dev), timeout=60, what="ffmpeg to run the transcode")
    children = dev.children()

    assert dev.proc is not None
    started = time.monotonic()
    dev.proc.send_signal(signal.SIGTERM)
    code = dev.proc.wait(timeout=30)
    took = time.monotonic() - started
    assert took < STOP_WITHIN_S, f"took {took:.1f}s\n{dev.log()}"
    assert code == 0, dev.log()
    until(lambda: gone(children), timeout=2, what=f"the stack's children to be gone: {children}")
    # The SSE stream was ended by the server, not left hanging.
    sse.settimeout(5)
    while chunk := sse.recv(65536):
        assert chunk  # drain what is left until EOF
    sse.close()
    upload.close()


def test_a_second_signal_while_stopping_exits_at_once_and_kills_every_child(
        stacks: list[Dev], tmp_path: Path, long_clip: Path) -> None:
    # A long drain: the first signal alone would keep the stack up for a minute.
    dev = new_dev(stacks, tmp_path / "a", ffmpeg_threads="1", drain_grace_s="60")
    dev.start()
    dev.wait_serving()
    submit(dev, long_clip)
    until(lambda: ffmpeg_running(dev), timeout=60, what="ffmpeg to run the transcode")
    children = dev.children()
    assert dev.proc is not None

    dev.proc.send_signal(signal.SIGINT)

    def refusing() -> bool:  # the gateway closed its listener: stopping has begun
        try:
            httpx.get(f"{dev.url}/healthz", timeout=1)
        except httpx.TransportError:
            return True
        return False

    until(refusing, timeout=10, what="the gateway to stop listening")
    assert dev.proc.poll() is None, "the drain should still be waiting for ffmpeg"
    started = time.monotonic()
    dev.proc.send_signal(signal.SIGINT)
    code = dev.proc.wait(timeout=10)
    assert time.monotonic() - started < 3.0
    assert code == 130, dev.log()
    assert "stopped at once" in dev.log()
    until(lambda: gone(children), timeout=5, what=f"the stack's children to be gone: {children}")


@pytest.mark.parametrize("which", ["nats", "http"])
def test_a_port_held_by_another_program_gives_one_line_and_exit_2(
        stacks: list[Dev], tmp_path: Path, which: str) -> None:
    dev = new_dev(stacks, tmp_path / "a")
    port = dev.nats_port if which == "nats" else dev.http_port
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        result = subprocess.run([JETCUT, "dev"], env=dev.env, capture_output=True, timeout=60)
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    setting = "JETCUT_NATS_PORT" if which == "nats" else "JETCUT_HTTP_PORT"
    assert f"port {port} " in lines[0] and setting in lines[0], lines[0]
    assert f"pid {os.getpid()} " in lines[0], lines[0]  # the holder, found from /proc
    assert not stack_processes(dev.root), "nothing may be left running"


def test_a_nats_server_left_by_an_earlier_run_is_stopped(
        stacks: list[Dev], tmp_path: Path) -> None:
    dev = new_dev(stacks, tmp_path / "a")
    left = NatsServer(Path(dev.env["JETCUT_DATA_DIR"]).resolve() / "nats")  # dev's server
    left.start()
    assert left.pid_path.read_text().strip() == str(left.pid)
    dev.start()
    dev.wait_serving()
    until(lambda: not left.running, timeout=10, what="the left-over server to be stopped")
    assert "left running by an earlier run" in dev.log()


def test_two_stacks_run_side_by_side(stacks: list[Dev], tmp_path: Path) -> None:
    one = new_dev(stacks, tmp_path / "one")
    two = new_dev(stacks, tmp_path / "two")
    one.start()
    two.start()
    one.wait_serving()
    two.wait_serving()
    for dev in (one, two):
        assert dev.proc is not None
        dev.proc.send_signal(signal.SIGTERM)
    for dev in (one, two):
        assert dev.proc is not None
        assert dev.proc.wait(timeout=30) == 0, dev.log()
        assert "jetcut dev stopped" in dev.log()


def test_jetcut_run_gateway_on_a_taken_port_gives_one_line_and_exit_2(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("JETCUT_")},
           "JETCUT_HTTP_PORT": str(port), "JETCUT_WORK_DIR": str(tmp_path)}
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        result = subprocess.run([JETCUT, "run", "gateway"], env=env, capture_output=True,
                                timeout=60)
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 2, lines
    assert len(lines) == 1 and f"port {port} " in lines[0] and "JETCUT_HTTP_PORT" in lines[0]
