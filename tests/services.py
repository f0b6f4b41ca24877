"""Real services for tests: Debian packages installed when missing, free loopback ports."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

_apt_lock = threading.Lock()
_apt_updated = False


def ensure_debian_package(binary: str, package: str) -> str:
    """Path of `binary`, installing Debian's `package` with apt when it is missing (the test setup's job)."""
    global _apt_updated
    found = shutil.which(binary) or next((p for p in (f"/usr/sbin/{binary}", f"/usr/bin/{binary}") if os.path.exists(p)), None)
    if found:
        return found
    if os.geteuid() != 0:
        pytest.fail(f"{binary} is missing and apt needs root: install Debian's '{package}' (apt-get install {package})")
    with _apt_lock:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if not _apt_updated:
            subprocess.run(["apt-get", "update", "-q"], check=True, env=env, capture_output=True, timeout=600)
            _apt_updated = True
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", package], check=True, env=env,
                       capture_output=True, timeout=900)
    found = shutil.which(binary) or next((p for p in (f"/usr/sbin/{binary}", f"/usr/bin/{binary}") if os.path.exists(p)), None)
    if not found:
        pytest.fail(f"installed Debian's '{package}' but found no '{binary}'")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, log: Path, name: str, *, timeout: float = 30.0,
                  poll: float = 0.1) -> None:
    """Wait until `process` (a server started by a test) accepts connections on 127.0.0.1:`port`; if it exits or
    `timeout` passes first, kill it and fail with the end of its `log`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"{name} did not start: {log.read_text()[-2000:]}")
            time.sleep(poll)


def stop_server(process: subprocess.Popen, folder: Path | None = None, *, timeout: float = 20.0) -> None:
    """Terminate a server a test started (killed after `timeout` seconds) and remove its folder."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
