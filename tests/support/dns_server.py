"""A real DNS server for the tests: Debian's dnsmasq on a loopback port, UDP and TCP.

It answers only from the records it is given, never from /etc/resolv.conf or
/etc/hosts, and returns NXDOMAIN for any other name under the test domains. Domains
listed as `unanswered` are forwarded to a socket that never replies, so queries for
them time out, as with a dead DNS list. dnsmasq truncates UDP answers that do not fit
and serves them again over TCP, so large answers exercise the TCP fallback too.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.reversename

from tests.support.tools import free_port, require_tool, stop_process, wait_until

# Names outside these domains are refused, so nothing leaks to a real resolver.
LOCAL_DOMAINS = ("test", "in-addr.arpa", "ip6.arpa")


@dataclass
class Records:
    """What the server knows. Forward records do not imply PTRs, and the other way round."""

    addresses: dict[str, list[str]] = field(default_factory=dict)  # name -> A/AAAA values
    pointers: dict[str, list[str]] = field(default_factory=dict)  # address -> PTR names
    unanswered: list[str] = field(default_factory=list)  # domains whose queries time out


class Silence:
    """A UDP socket that receives queries and never answers them."""

    def __init__(self):
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.host, self.port = self.socket.getsockname()

    def close(self) -> None:
        self.socket.close()


class DnsServer:
    """dnsmasq at `host`:`port` serving `records`; a context manager."""

    def __init__(self, workdir: Path, records: Records, run_in: Sequence[str] = ()):
        """run_in: a command prefix, e.g. `ip netns exec NS`, to serve inside a namespace."""
        self.dnsmasq = require_tool("dnsmasq", "dnsmasq-base")
        self.run_in = list(run_in)
        self.host = "127.0.0.1"
        self.port = free_port()
        self.log_path = workdir / "dnsmasq.log"
        workdir.mkdir(parents=True, exist_ok=True)
        self.silence = Silence()
        self.process: subprocess.Popen | None = None
        self.argv = [
            self.dnsmasq, "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
            "--no-hosts", "--no-poll", "--bind-interfaces", f"--listen-address={self.host}",
            f"--port={self.port}", "--pid-file=", "--cache-size=0", "--log-queries",
            f"--log-facility={self.log_path}",
            *(f"--local=/{domain}/" for domain in LOCAL_DOMAINS),
        ]
        for name, values in records.addresses.items():
            self.argv += [f"--address=/{name}/{value}" for value in values]
        for address, names in records.pointers.items():
            reverse = dns.reversename.from_address(address).to_text(omit_final_dot=True)
            self.argv += [f"--ptr-record={reverse},{name}" for name in names]
        self.argv += [f"--server=/{domain}/{self.silence.host}#{self.silence.port}"
                      for domain in records.unanswered]

    def start(self, timeout: float = 10.0) -> None:
        self.process = subprocess.Popen([*self.run_in, *self.argv], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)

        def answers() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"dnsmasq exited: {self.process.stderr.read().strip()}")
            if self.run_in:  # probe from inside the namespace
                return self._probe_inside()
            query = dns.message.make_query("readiness-probe.test.", "A")
            try:
                reply = dns.query.udp(query, self.host, port=self.port, timeout=0.2)
            except (OSError, dns.exception.Timeout):
                return False
            return reply.rcode() == dns.rcode.NXDOMAIN

        try:
            wait_until(answers, timeout, "dnsmasq to answer")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        stop_process(self.process)
        if self.process:
            self.process.stderr.close()
        self.silence.close()

    def _probe_inside(self) -> bool:
        probe = (f"import dns.message, dns.query; dns.query.udp(dns.message.make_query("
                 f"'readiness-probe.test.', 'A'), {self.host!r}, port={self.port}, timeout=0.2)")
        return subprocess.run([*self.run_in, sys.executable, "-c", probe], check=False,
                              capture_output=True, timeout=10).returncode == 0

    @property
    def nameserver(self) -> str:
        return f"{self.host}:{self.port}"

    def queries(self) -> str:
        """dnsmasq's query log so far (one line per query, with its transport unsaid)."""
        return self.log_path.read_text() if self.log_path.exists() else ""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
