"""Small helpers for the test servers: finding their Debian tools, ports, waiting, stopping."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time


def require_tool(tool: str, package: str) -> str:
    """The path of `tool`, also searched in the sbin directories a non-root PATH omits."""
    path = shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if path is None:
        raise RuntimeError(f"'{tool}' not found: install the Debian package '{package}' "
                           "(listed in deps/apt-test.txt; run scripts/install-deps test)")
    return path


def run_checked(argv: list[str], timeout: float = 60) -> None:
    """Run a setup command; on failure raise with its own error output."""
    result = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()[-2000:]}")


def stop_process(process: subprocess.Popen | None, grace: float = 5) -> None:
    """SIGTERM a test server, then SIGKILL it if it has not exited within `grace` seconds."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(grace)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on host a moment ago."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll predicate until it returns true; TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def port_accepts(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        return probe.connect_ex((host, port)) == 0
