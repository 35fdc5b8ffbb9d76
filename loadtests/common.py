"""What every benchmark shares: result rows, a throw-away nats-server, machine facts, reports."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from shared.natsserver import NatsServer, find_nats_server

REPO = Path(__file__).resolve().parent.parent
REPORTS = Path(__file__).resolve().parent / "reports"
VENV_BIN = Path(sys.executable).parent


@dataclass
class Row:
    """One line of the report: jetcut's figure, its peer's, their ratio and the target.

    ``target_on`` says what the target is checked against: the ratio (jetcut/peer), or
    jetcut's own figure (memory growth has no meaningful peer ratio).
    """

    benchmark: str
    metric: str
    unit: str
    jetcut: float | None
    peer_name: str = ""
    peer: float | None = None
    target_op: Literal[">=", "<=", "<", ""] = ""
    target: float | None = None
    target_on: Literal["ratio", "value"] = "ratio"
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.jetcut is None or not self.peer:
            return None
        return self.jetcut / self.peer

    @property
    def met(self) -> bool | None:
        if not self.target_op or self.target is None:
            return None
        value = self.ratio if self.target_on == "ratio" else self.jetcut
        if value is None:
            return None
        return {">=": value >= self.target, "<=": value <= self.target,
                "<": value < self.target}[self.target_op]

    def target_text(self) -> str:
        if not self.target_op or self.target is None:
            return "—"
        what = "ratio" if self.target_on == "ratio" else "jetcut"
        return f"{what} {self.target_op} {self.target:g}"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "met": self.met}


@dataclass
class BenchResult:
    """What one benchmark hands back: report rows, raw numbers, and notes for readers."""

    name: str
    rows: list[Row] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    elapsed_s: float = 0.0


def load_functions(names: list[str]) -> list[Any]:
    """The named functions, imported one by one (``functions.<name>.function``).

    Deliberately not through ``functions.registry``, which imports every function folder:
    a benchmark of the bus or of one recipe should not fail because an unrelated function
    is mid-edit.
    """
    import importlib

    return [importlib.import_module(f"functions.{name}").function for name in names]


def all_functions(required: list[str]) -> tuple[list[Any], str | None]:
    """Every registered function; if the registry cannot be imported, just ``required``
    (and why, for the report)."""
    try:
        from functions.registry import FUNCTIONS
    except Exception as exc:
        why = f"functions.registry failed to import ({type(exc).__name__}: {exc}); ran only " \
              f"{', '.join(required)}"
        return load_functions(required), why
    return list(FUNCTIONS.values()), None


def say(message: str) -> None:
    """Progress for the person watching (stderr, so stdout keeps only the tables)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def temp_dir(prefix: str) -> Iterator[Path]:
    """A scratch directory removed afterwards, whatever happens (benchmarks write gigabytes)."""
    path = Path(tempfile.mkdtemp(prefix=f"jetcut-bench-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def nats_server(data_dir: Path, name: str = "jetcut-bench") -> Iterator[NatsServer]:
    """A real nats-server (the one jetcut ships with), loopback only, stopped afterwards."""
    server = NatsServer(data_dir, server_name=name)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "unavailable"


def machine_info() -> dict[str, Any]:
    """Enough about the machine to tell whether two reports are comparable."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024**2, 1)
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "mem_gib": mem_gib,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nats_server": "unavailable",
    }
    with contextlib.suppress(FileNotFoundError):
        info["nats_server"] = _version([find_nats_server(), "--version"])
    return info


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def one_line(text: str, limit: int = 140) -> str:
    """An error fit for a table cell: its last non-empty line, no pipes, bounded."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = (lines[-1] if lines else "").replace("|", "/")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def table(results: list[BenchResult]) -> str:
    lines = [
        "| benchmark | metric | jetcut | peer | peer figure | ratio (jetcut/peer) | target "
        "| met? |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        if result.error and not result.rows:
            lines.append(f"| {result.name} | failed: {one_line(result.error)} | — | — | — | — "
                         "| — | ✗ |")
        for row in result.rows:
            met = {True: "✓ yes", False: "✗ no", None: "—"}[row.met]
            lines.append(
                f"| {row.benchmark} | {row.metric} | {fmt(row.jetcut)} {row.unit} | "
                f"{row.peer_name or '—'} | "
                f"{fmt(row.peer) + ' ' + row.unit if row.peer is not None else '—'} | "
                f"{fmt(row.ratio, 3)} | {row.target_text()} | {met} |"
            )
    return "\n".join(lines)


def write_reports(results: list[BenchResult], *, quick: bool, only: list[str],
                  started: datetime, machine: dict[str, Any]) -> tuple[Path, Path]:
    """``reports/latest.md`` (human, commit-friendly) and a timestamped JSON (raw numbers)."""
    REPORTS.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    mode = "quick" if quick else "full"
    scope = ", ".join(only) if only else "all"
    md = [
        "# jetcut benchmark report",
        "",
        f"- run: {started.isoformat(timespec='seconds')} — mode **{mode}**, benchmarks: {scope}",
        f"- machine: {machine['nproc']} x {machine['cpu_model']}, {machine['mem_gib']} GiB, "
        f"Linux {machine['kernel']}, Python {machine['python']}, {machine['nats_server']}",
        "- every ratio compares figures measured in this same run, on this machine; "
        "see loadtests/README.md for what each scenario includes",
        "",
        table(results),
        "",
    ]
    for result in results:
        if not (result.notes or result.error):
            continue
        md.append(f"## {result.name}")
        md.append("")
        if result.error:
            md.append("- **error:**")
            md.append("")
            md.extend(f"      {line}" for line in result.error.splitlines())
            md.append("")
        md.extend(f"- {note}" for note in result.notes)
        md.append("")
    md.append(f"Raw numbers: `loadtests/reports/{stamp}.json` (not committed).")
    md_path = REPORTS / "latest.md"
    md_path.write_text("\n".join(md) + "\n")
    payload = {
        "started": started.isoformat(), "mode": mode, "only": only, "machine": machine,
        "results": [
            {"name": r.name, "elapsed_s": round(r.elapsed_s, 2), "error": r.error,
             "rows": [row.as_dict() for row in r.rows], "notes": r.notes, "raw": r.raw}
            for r in results
        ],
    }
    json_path = REPORTS / f"{stamp}.json"
    text = json.dumps(payload, indent=2, default=str) + "\n"
    json_path.write_text(text)
    (REPORTS / "latest.json").write_text(text)
    return md_path, json_path


def now() -> datetime:
    return datetime.now(UTC)
