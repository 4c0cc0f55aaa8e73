"""A Portcullis appliance booted under QEMU (vm/boot) for the end-to-end tests.

Its Internet side forwards the host's `smtp_port` to port 25 (the guest sees the client
as 10.0.2.2), its management side forwards `ssh_port`. The backend mail server on the
host appears to it as 10.0.2.100:25.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.support.tools import free_port

TOP = Path(__file__).resolve().parents[2]
BOOT = TOP / "vm" / "boot"
BUILD_KEY = TOP / "build" / "cache" / "id_build"
BACKEND_AS_SEEN_BY_GUEST = "10.0.2.100:25"
ADMIN = "admin"
# ssh as the seed's administrator, with the build key, to a box whose host key is new.
SSH = ["ssh", "-i", str(BUILD_KEY), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
       "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10"]


def image_version() -> str:
    import tomllib
    return tomllib.loads((TOP / "pyproject.toml").read_text())["project"]["version"]


def built(suffix: str) -> Path:
    """build/portcullis-VERSION.<suffix>, or an error saying how to make it."""
    path = TOP / "build" / f"portcullis-{image_version()}.{suffix}"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `make image` first")
    return path


def read_banner(port: int, timeout: float = 10.0) -> bytes:
    """The first line the appliance sends on 127.0.0.1:port, b"" if none in time."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
            conn.settimeout(timeout)
            return conn.recv(512)
    except OSError:
        return b""


class Appliance:
    def __init__(self, workdir: Path, *, disk: Path | None = None, iso: Path | None = None,
                 seed: Path | None = None, backend: str | None = None, uefi: bool = False,
                 data: Path | None = None):
        self.workdir = workdir
        self.serial_log = workdir / "console.log"
        self.smtp_port, self.ssh_port = free_port(), free_port()
        argv = [str(BOOT), "--serial-log", str(self.serial_log), "--smtp-port", str(self.smtp_port),
                "--ssh-port", str(self.ssh_port)]
        if disk:
            argv += ["--disk", str(disk), "--snapshot"]
        if iso:
            argv += ["--iso", str(iso)]
        if seed:
            argv += ["--seed", str(seed)]
        if backend:
            argv += ["--backend", backend]
        if uefi:
            argv.append("--uefi")
        if data:  # the data disk (PORTCULLIS-DATA): written through, even with --snapshot
            argv += ["--data", str(data)]
        self.argv = argv
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0

    def start(self) -> None:
        self.started_at = time.monotonic()
        with open(self.workdir / "qemu.err", "w") as qemu_errors:
            self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                            stdout=qemu_errors, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()

    # --- waiting ------------------------------------------------------------------

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"QEMU exited ({self.process.returncode}): "
                               f"{(self.workdir / 'qemu.err').read_text()[-2000:]}")

    def console(self) -> str:
        return self.serial_log.read_text(errors="replace") if self.serial_log.exists() else ""

    def wait_for_console(self, text: str, timeout: float) -> float:
        """Seconds since start when `text` appeared on the serial console."""
        deadline = time.monotonic() + timeout
        while text not in self.console():
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"'{text}' not on the console within {timeout} s; "
                                   f"console tail:\n{self.console()[-3000:]}")
            time.sleep(1)
        return time.monotonic() - self.started_at

    def wait_for_banner(self, timeout: float) -> float:
        """Seconds since start when the SMTP banner (220) first came."""
        deadline = time.monotonic() + timeout
        while not read_banner(self.smtp_port, timeout=5).startswith(b"220"):
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"no SMTP banner within {timeout} s; console tail:\n"
                                   f"{self.console()[-3000:]}")
            time.sleep(2)
        return time.monotonic() - self.started_at

    # --- administration -----------------------------------------------------------

    def ssh_argv(self) -> list[str]:
        return [*SSH, "-p", str(self.ssh_port), f"{ADMIN}@127.0.0.1"]

    def ssh(self, command: str, timeout: float = 60, check: bool = True) -> str:
        """Run a command as the administrator (prefix sudo for root); its stdout."""
        result = subprocess.run(self.ssh_argv() + [command], capture_output=True, text=True,
                                timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise RuntimeError(f"ssh {command!r} failed ({result.returncode}): {result.stderr}")
        return result.stdout

    def wait_for_ssh(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                self.ssh("true", timeout=20)
                return
            except (RuntimeError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no SSH login as {ADMIN} within {timeout} s") from None
                time.sleep(3)

    def local_banner(self) -> str:
        """The gate's banner as a client on the box itself sees it (lo is never banned)."""
        return self.ssh("python3 -c \"import socket; s = socket.create_connection(('127.0.0.1', 25), "
                        "timeout=30); s.settimeout(30); print(s.recv(512).decode())\"").strip()

    def wait_for_local_banner(self, timeout: float) -> float:
        """Seconds since start when the gate first answered on the box itself: the way to
        wait for a boot when the host's address (the only client) is banned."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                if self.local_banner().startswith("220"):
                    return time.monotonic() - self.started_at
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gate did not answer on the box within {timeout} s; "
                                   f"console tail:\n{self.console()[-3000:]}")
            time.sleep(3)

    def tls_fingerprint(self) -> str:
        """SHA-256 of the certificate STARTTLS presents, as a client on the box sees it."""
        return self.ssh("python3 -c \"import hashlib, smtplib, ssl; "
                        "s = smtplib.SMTP('127.0.0.1', 25, local_hostname='probe.example.test', "
                        "timeout=60); s.starttls(context=ssl._create_unverified_context()); "
                        "print(hashlib.sha256(s.sock.getpeercert(True)).hexdigest()); s.quit()\"").strip()

    def power_off(self, timeout: float = 180) -> float:
        """Shut the guest down cleanly (QEMU exits with it); seconds it took."""
        started = time.monotonic()
        self.ssh("sudo systemctl poweroff", check=False, timeout=30)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"the guest did not power off within {timeout} s; console tail:\n"
                               f"{self.console()[-3000:]}") from None
        return time.monotonic() - started

    def reboot(self, timeout: float) -> float:
        """Reboot the guest (QEMU stays: --snapshot writes survive); seconds until the
        gate answers again on the box."""
        boot_id = self.ssh("cat /proc/sys/kernel/random/boot_id")
        self.ssh("sudo systemctl reboot", check=False, timeout=30)
        started = time.monotonic()
        deadline = started + timeout
        while True:
            self._check_alive()
            try:
                if self.ssh("cat /proc/sys/kernel/random/boot_id", timeout=20) != boot_id \
                        and self.local_banner().startswith("220"):
                    return time.monotonic() - started
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gate did not answer within {timeout} s of a reboot")
            time.sleep(3)


def require_tools() -> None:
    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ("ssh", "openssh-client"),
                          ("swaks", "swaks"), ("xorriso", "xorriso")):
        if shutil.which(tool) is None:
            raise RuntimeError(f"'{tool}' not found: apt-get install {package} "
                               "(deps/apt-image.txt; scripts/install-deps image)")
