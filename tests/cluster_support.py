"""Real services for the shared-memory and cluster tests: PostgreSQL from Debian's binaries, Milvus Lite's server.

Both run on free loopback ports in temporary folders and stop when the test session ends. PostgreSQL refuses to
run as root, so as root it runs as the `postgres` user the Debian package creates.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from services import ensure_debian_package, free_port, stop_server, wait_for_port

READY_TIMEOUT_S = 60


def _pg_bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        ensure_debian_package("pg_ctlcluster", "postgresql")  # Debian keeps initdb and pg_ctl out of PATH
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        pytest.fail("installed Debian's postgresql but found no /usr/lib/postgresql/*/bin/initdb")
    return Path(found[-1]).parent


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass
class PostgresServer:
    port: int
    folder: Path
    bindir: Path
    user: str = "vidmem"

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A fresh database; returns its URL (without vidmem's parameters)."""
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        subprocess.run(_as_postgres([str(self.bindir / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "immediate",
                                     "stop"]), capture_output=True, timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)


def start_postgres() -> PostgresServer:
    """initdb + pg_ctl start on a free port, in a fresh folder under /tmp (the postgres user must reach it)."""
    bindir = _pg_bindir()
    folder = Path(tempfile.mkdtemp(prefix="vidmem-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    port = free_port()
    data = folder / "data"
    init = subprocess.run(_as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", "vidmem", "-A", "trust",
                                        "-E", "UTF8", "--no-sync"]), capture_output=True, text=True, timeout=120)
    if init.returncode != 0:
        pytest.fail(f"initdb failed: {init.stderr[-2000:]}")
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c max_connections=200"
    start = subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l",
                                         str(folder / "log"), "-w", "-t", str(READY_TIMEOUT_S), "start"]),
                           capture_output=True, text=True, timeout=READY_TIMEOUT_S + 30)
    if start.returncode != 0:
        log = (folder / "log").read_text() if (folder / "log").exists() else ""
        pytest.fail(f"PostgreSQL did not start: {start.stderr[-1000:]} {log[-2000:]}")
    return PostgresServer(port=port, folder=folder, bindir=bindir)


@dataclass
class MilvusServer:
    port: int
    folder: Path
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"milvus://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_server(self.process, self.folder)


def start_milvus(port: int | None = None, folder: Path | None = None) -> MilvusServer:
    """Milvus Lite's gRPC server (`milvus-lite server`): the same client code talks to standalone Milvus."""
    port = port or free_port()
    folder = folder or Path(tempfile.mkdtemp(prefix="vidmem-milvus-"))
    log = open(folder / "server.log", "ab")
    process = subprocess.Popen([sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(folder / "data"),
                                "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    wait_for_port(port, process, folder / "server.log", "Milvus Lite", timeout=READY_TIMEOUT_S, poll=0.2)
    return MilvusServer(port=port, folder=folder, process=process)


@pytest.fixture(scope="session")
def postgres():
    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def milvus():
    server = start_milvus()
    yield server
    server.stop()


_counter = iter(range(1_000_000))


@pytest.fixture()
def memory_url(postgres: PostgresServer, milvus: MilvusServer, tmp_path: Path) -> str:
    """A fresh shared-memory URL: its own database, the session's Milvus, tokens under the test's folder."""
    database = f"vidmem_{os.getpid()}_{next(_counter)}"
    return f"{postgres.create_database(database)}?index={milvus.url}&tokens={tmp_path / 'tokens'}"
