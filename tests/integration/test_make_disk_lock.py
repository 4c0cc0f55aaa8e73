"""vm/make-disk builds one disk at a time: a second build waits for the first one's lock
(two at once once shared a loop device and wrote an empty filesystem)."""

from __future__ import annotations

import fcntl
import subprocess
import time
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]


def run_make_disk(tmp_path: Path, lock: Path, wait: int) -> tuple[subprocess.CompletedProcess, float]:
    rootfs = tmp_path / "rootfs"
    (rootfs / "sbin").mkdir(parents=True, exist_ok=True)
    init = rootfs / "sbin" / "init"
    init.write_text("#!/bin/sh\n")
    init.chmod(0o755)
    started = time.monotonic()
    result = subprocess.run([str(TOP / "vm" / "make-disk"), str(rootfs), str(tmp_path / "out.qcow2")],
                            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "MAKE_DISK_LOCK": str(lock),
                                 "MAKE_DISK_LOCK_WAIT": str(wait)},
                            capture_output=True, text=True, timeout=60, check=False)
    return result, time.monotonic() - started


def test_a_second_build_waits_for_the_lock_then_gives_up_naming_it(tmp_path):
    lock = tmp_path / "make-disk.lock"
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a build in progress
        result, seconds = run_make_disk(tmp_path, lock, wait=2)
    assert result.returncode == 1
    assert f"another make-disk still holds {lock}" in result.stderr
    assert seconds >= 2  # it waited before giving up
    assert not (tmp_path / "out.qcow2").exists() and not (tmp_path / "out.qcow2.raw").exists()

