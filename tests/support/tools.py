"""Finding the Debian tools the test servers run, with an error naming the package."""

from __future__ import annotations

import os
import shutil
import subprocess


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
