"""Network namespaces for tests: real kernels, real nftables, no effect on the host.

    with netns.namespace() as ns:                       # one namespace, loopback up
        ns.run(["nft", "-f", "-"], input=RULESET)

    with netns.veth_pair() as (appliance, client):      # two namespaces joined by a veth
        gate = appliance.popen([...])                   # stopped when the block ends
        client.run(["swaks", "--server", appliance.address, ...])

Every namespace, and every process started with `popen`, is removed when the `with`
block ends, even on error. Names carry the test process id and a random part, so
parallel test runs on one machine do not collide. Needs root (`requires_root`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator, Sequence

import pytest

IP = shutil.which("ip") or "/usr/sbin/ip"
COMMAND_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
CLONE_NEWNET = 0x40000000  # sched.h

requires_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="network namespaces need root (run the suite as root)"
)


class NetnsError(RuntimeError):
    """A namespace command failed; the message carries the command and its stderr."""


def _run_checked(argv: Sequence[str], timeout: float = COMMAND_TIMEOUT, **kwargs):
    try:
        result = subprocess.run(
            list(argv), check=False, capture_output=True, text=True, timeout=timeout, **kwargs
        )
    except FileNotFoundError:
        raise NetnsError(f"{argv[0]} not found: install the iproute2 package") from None
    if result.returncode != 0:
        raise NetnsError(
            f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}"
        )
    return result


class Namespace:
    """One network namespace. `address` is its first IPv4 address, once given."""

    def __init__(self, name: str):
        self.name = name
        self.address: str | None = None
        self._processes: list[subprocess.Popen] = []

    def prefix(self, argv: Sequence[str]) -> list[str]:
        """The command line that runs argv inside this namespace."""
        return [IP, "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = COMMAND_TIMEOUT,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run argv to completion inside the namespace; text output is captured."""
        if check:
            return _run_checked(self.prefix(argv), timeout=timeout, input=input)
        return subprocess.run(self.prefix(argv), check=False, capture_output=True,
                              text=True, timeout=timeout, input=input)

    def popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start argv inside the namespace; it is stopped when the namespace goes away.

        The process gets its own process group, so stopping it also stops its children.
        """
        process = subprocess.Popen(self.prefix(argv), start_new_session=True, **kwargs)
        self._processes.append(process)
        return process

    def stop_processes(self) -> None:
        """SIGTERM each started process group, then SIGKILL what is left after a grace."""
        for process in self._processes:
            _signal_group(process, signal.SIGTERM)
        for process in self._processes:
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait(timeout=STOP_TIMEOUT)
        self._processes.clear()

    def __repr__(self) -> str:
        return f"Namespace({self.name!r}, address={self.address!r})"


def call_in_netns(name: str, function, *args):
    """function(*args) in a thread of this process inside namespace `name` (by its
    /run/netns name): the sockets it makes stay in that namespace after it returns."""
    outcome: dict = {}

    def enter_and_call():
        libc = ctypes.CDLL(None, use_errno=True)
        with open(f"/run/netns/{name}") as netns:
            if libc.setns(netns.fileno(), CLONE_NEWNET) != 0:
                outcome["error"] = OSError(ctypes.get_errno(), f"setns into {name}")
                return
        try:
            outcome["value"] = function(*args)
        except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
            outcome["error"] = e

    thread = threading.Thread(target=enter_and_call, name=f"in {name}")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)


def _unique_name(role: str) -> str:
    return f"pc-{role}-{os.getpid()}-{secrets.token_hex(3)}"


def _create(role: str) -> Namespace:
    namespace = Namespace(_unique_name(role))
    _run_checked([IP, "netns", "add", namespace.name])
    try:
        namespace.run([IP, "link", "set", "lo", "up"])
    except Exception:
        _destroy(namespace)
        raise
    return namespace


def _destroy(namespace: Namespace) -> None:
    """Stop its processes and delete it. Deleting a namespace also deletes its veth end."""
    try:
        namespace.stop_processes()
    finally:
        subprocess.run([IP, "netns", "del", namespace.name], check=False,
                       capture_output=True, timeout=COMMAND_TIMEOUT)


@contextlib.contextmanager
def namespace(role: str = "ns") -> Iterator[Namespace]:
    """A fresh namespace with only loopback, deleted afterwards."""
    created = _create(role)
    try:
        yield created
    finally:
        _destroy(created)


@contextlib.contextmanager
def veth_pair(appliance_address: str = "10.251.0.1/24",
              client_address: str = "10.251.0.2/24") -> Iterator[tuple[Namespace, Namespace]]:
    """Two namespaces, "appliance" and "client", joined by a veth pair with IPv4 addresses.

    Yields (appliance, client); each one's `address` is its address without the prefix.
    """
    with namespace("app") as appliance, namespace("cli") as client:
        link = secrets.token_hex(3)  # interface names are limited to 15 characters
        appliance_end, client_end = f"pca{link}", f"pcc{link}"
        appliance.run([IP, "link", "add", appliance_end, "type", "veth",
                       "peer", "name", client_end, "netns", client.name])
        for ns, end, address in ((appliance, appliance_end, appliance_address),
                                 (client, client_end, client_address)):
            ns.run([IP, "addr", "add", address, "dev", end])
            ns.run([IP, "link", "set", end, "up"])
            ns.address = address.split("/")[0]
        yield appliance, client
