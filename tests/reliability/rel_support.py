"""Helpers shared by the reliability tests: the real CLI as a subprocess, memory snapshots, a Mosquitto broker."""
from __future__ import annotations

import asyncio
import getpass
import hashlib
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from services import ensure_debian_package, free_port

WAIT = 180.0  # seconds: the most any one step may take before the test calls it a hang (2 busy cores, CLI start-up)


def cli(*args: str, memory: Path, tiny) -> list[str]:  # noqa: ANN001 - tiny: conftest's TinyModels
    """The `vidmem` command line with the tiny checkpoints on CPU."""
    return [sys.executable, "-m", "vidmem", *args, "--memory", str(memory), "--model", str(tiny.llava),
            "--embedder", str(tiny.clip), "--device", "cpu"]


def cli_env(**extra: str) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", **extra}
    env.pop("VIDMEM_DEBUG", None)  # tracebacks would hide the one-line error the tests check
    return env


def one_error_line(stderr: str) -> str:
    """The CLI's single `vidmem: error: ...` line; fails on tracebacks or chatter."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("vidmem: error: "), stderr[-3000:]
    return lines[0]


def committed_ids(memory: Path, stream: str | None = None) -> set[int]:
    """Segment ids a reader sees committed right now (plain SQLite, read-only: what any reader would see)."""
    db = memory / "memory.sqlite"
    if not db.exists():
        return set()
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            if stream is None:
                rows = conn.execute("SELECT id FROM segments").fetchall()
            else:
                rows = conn.execute("SELECT s.id FROM segments s JOIN streams t ON t.id = s.stream_id "
                                    "WHERE t.name = ?", (stream,)).fetchall()
        finally:
            conn.close()
    except sqlite3.OperationalError:  # the schema is not there yet (the writer is creating it)
        return set()
    return {r[0] for r in rows}


def snapshot(memory: Path) -> dict:
    """What the memory holds, logically: every table's rows and every token file's hash (not -wal/-shm files)."""
    conn = sqlite3.connect(f"file:{memory / 'memory.sqlite'}?mode=ro", uri=True)
    try:
        tables = {name: sorted(map(repr, conn.execute(f"SELECT * FROM {name}")))  # noqa: S608 - our own names
                  for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        conn.close()
    files = {str(p.relative_to(memory)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted((memory / "tokens").rglob("*")) if p.is_file()}
    return {"tables": tables, "files": files}


def check_consistent(memory: Path) -> dict:
    """Reopen the memory as a writer would and check it: every segment reads back, the index matches SQLite."""
    from vidmem.memory import Memory

    with Memory.open(memory) as m:
        report = m.verify()
        assert report["bad"] == [], report
        assert report["missing_from_index"] == [] and report["extra_in_index"] == [], report
        for row in m.segments():
            assert m.read_tokens(row).shape == (row.tokens, m.manifest.dim)
        return report


class Broker:
    """A Mosquitto on a free loopback port (persistence in `folder`); optional TLS listener and password file."""

    def __init__(self, folder: Path, *, users: dict[str, str] | None = None, tls: tuple[Path, Path, Path] | None = None):
        self.binary = ensure_debian_package("mosquitto", "mosquitto")
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)
        lines = [f"user {getpass.getuser()}", f"listener {self.port} 127.0.0.1", "persistence true",
                 f"persistence_location {folder}/", f"log_dest file {folder}/mosquitto.log"]
        if tls is not None:
            ca, cert, key = tls
            lines += [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}"]
        if users:
            tool = Path(self.binary).with_name("mosquitto_passwd")
            tool = tool if tool.exists() else Path(ensure_debian_package("mosquitto_passwd", "mosquitto"))
            passwd = folder / "passwd"
            for i, (user, password) in enumerate(users.items()):
                subprocess.run([str(tool), "-b", *(["-c"] if i == 0 else []), str(passwd), user, password],
                               check=True, capture_output=True)
            passwd.chmod(0o600)
            lines += ["allow_anonymous false", f"password_file {passwd}"]
        else:
            lines.append("allow_anonymous true")
        self.config = folder / "mosquitto.conf"
        self.config.write_text("\n".join(lines) + "\n")

    def url(self, scheme: str = "mqtt", credentials: str = "") -> str:
        return f"{scheme}://{credentials + '@' if credentials else ''}127.0.0.1:{self.port}"

    def start(self) -> Broker:
        self.process = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not start: {(self.folder / 'mosquitto.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None


class LoopThread:
    """An asyncio event loop in a thread (a server's own loop); call(coro) runs a coroutine on it and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="reliability-loop", daemon=True)
        self.thread.start()

    def call(self, coro, timeout: float = WAIT):  # noqa: ANN001, ANN201
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (psutil when installed, else /proc/PID/status VmRSS)."""
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"cannot read the resident memory of process {pid}")
