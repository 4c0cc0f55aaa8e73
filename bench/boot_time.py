#!/usr/bin/env python3
"""Time from QEMU start to the SMTP banner, for the qcow2 and the live ISO in one run.

Each boot: vm/boot with a seed (the end-to-end tests' site: tests/e2e/conftest.py), no
data disk, the qcow2 with --snapshot; the clock starts when QEMU is started and stops
when 127.0.0.1:SMTP_PORT first sends a line starting with 220 (the gate's pre-greet
wait included). Then QEMU is killed. Prints each boot and the median, min and max per
image: figures only, nothing is asserted. Run it on a quiet machine (no other VM, no
image build): under TCG every other busy core shows in the figures.

With --analyze, the first boot of each image also logs in over SSH (the seed installs
build/cache/id_build.pub for `admin`) and prints `systemd-analyze critical-chain
portcullis.service` and the top of `systemd-analyze blame`.

Usage: .venv/bin/python bench/boot_time.py [--runs 3] [--only qcow2|iso] [--analyze]
                                           [--qcow2 DISK] [--iso ISO]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TOP))

from tests.e2e.appliance import BOOT, BUILD_KEY, built
from tests.e2e.conftest import gate_config, make_seed
from tests.support.tools import free_port

POLL_INTERVAL = 0.25  # below the firewall's 5 new connections per second and source


def banner(port: int) -> bytes:
    """The first bytes the gate sends on a new connection, b"" if none (yet)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.settimeout(3)  # more than the pre-greet wait
            return conn.recv(512)
    except OSError:
        return b""


def ssh(ssh_port: int, command: str) -> str:
    argv = ["ssh", "-i", str(BUILD_KEY), "-p", str(ssh_port), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10", "admin@127.0.0.1", command]
    for _ in range(30):
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 255:  # 255: no SSH yet
            return result.stdout + result.stderr
        time.sleep(2)
    return f"(no SSH login: {result.stderr.strip()})"


def boot_once(kind: str, image: Path, seed: Path, workdir: Path, timeout: float,
              analyze: bool) -> float:
    smtp_port, ssh_port = free_port(), free_port()
    argv = [str(BOOT), f"--{'disk' if kind == 'qcow2' else 'iso'}", str(image), "--seed", str(seed),
            "--smtp-port", str(smtp_port), "--ssh-port", str(ssh_port),
            "--serial-log", str(workdir / f"console-{kind}.log")]
    if kind == "qcow2":
        argv.append("--snapshot")
    started = time.monotonic()
    qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    try:
        while not banner(smtp_port).startswith(b"220"):
            if qemu.poll() is not None:
                raise RuntimeError(f"QEMU exited ({qemu.returncode})")
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{kind}: no banner within {timeout} s "
                                   f"(console: {workdir / f'console-{kind}.log'})")
            time.sleep(POLL_INTERVAL)
        elapsed = time.monotonic() - started
        if analyze:
            print(f"--- {kind}: systemd-analyze (first boot)")
            print(ssh(ssh_port, "sudo systemd-analyze time; "
                                "sudo systemd-analyze critical-chain --no-pager portcullis.service; "
                                "sudo systemd-analyze blame --no-pager | head -n 25"))
        return elapsed
    finally:
        qemu.kill()
        qemu.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="boots per image (default 3)")
    parser.add_argument("--only", choices=("qcow2", "iso"), help="time one image only")
    parser.add_argument("--qcow2", type=Path, help="the disk image (default: build/portcullis-VERSION.qcow2)")
    parser.add_argument("--iso", type=Path, help="the live ISO (default: build/portcullis-VERSION.iso)")
    parser.add_argument("--timeout", type=float, default=420, help="seconds to wait for a banner")
    parser.add_argument("--analyze", action="store_true",
                        help="print systemd-analyze critical-chain and blame after the first boot")
    args = parser.parse_args()
    kinds = [args.only] if args.only else ["qcow2", "iso"]
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="portcullis-boot-time-") as tmp:
        workdir = Path(tmp)
        seed = make_seed(workdir / "seed", gate_config())
        for kind in kinds:
            image = getattr(args, kind) or built(kind)
            results[kind] = []
            for run in range(args.runs):
                seconds = boot_once(kind, image, seed, workdir, args.timeout,
                                    analyze=args.analyze and run == 0)
                results[kind].append(seconds)
                print(f"{kind} boot {run + 1}/{args.runs}: {seconds:.1f} s to the banner", flush=True)
    print("\nseconds from QEMU start to the SMTP banner (TCG or KVM as vm/detect-accel chose):")
    for kind, times in results.items():
        print(f"  {kind:5}  median {statistics.median(times):6.1f}  min {min(times):6.1f}  "
              f"max {max(times):6.1f}  ({len(times)} boots)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
