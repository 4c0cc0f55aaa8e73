"""A private redis-server for the tests (Debian's, 7.0; Valkey speaks the same protocol).

It never touches a system instance: its own directory, no persistence, a free port, an
ACL user `gate` with a password, and optionally TLS. `kill()`, `pause()`, `resume()` and
`start()` again simulate an outage, a hung or partitioned server, and its return on the
same port.

    with RedisServer(tmp_path) as server:
        server.url          # redis://127.0.0.1:<port>/0
        server.cli("DBSIZE")
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from tests.support.slapd import TestCertificates
from tests.support.tools import free_port, require_tool, stop_process, wait_until

USER = "gate"
PASSWORD = "fleet-secret"
ADMIN_USER, ADMIN_PASSWORD = "admin", "admin-secret"  # for the tests' own reads (INFO)


class RedisServer:
    def __init__(self, workdir: Path, host: str = "127.0.0.1", port: int | None = None,
                 run_in: Sequence[str] = (), tls: TestCertificates | None = None):
        """run_in: a command prefix, e.g. to run it in a network namespace. With tls, the
        port speaks TLS only (rediss://), with tls's server certificate."""
        self.binary = require_tool("redis-server", "redis-server")
        self.run_in = list(run_in)
        self.tls = tls
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port or free_port(host)
        self.password_file = workdir / "redis.password"
        self.password_file.write_text(PASSWORD + "\n")
        self.config = workdir / "redis.conf"
        listen = f"port {self.port}\n" if tls is None else (
            f"port 0\ntls-port {self.port}\ntls-cert-file {tls.server_cert}\n"
            f"tls-key-file {tls.server_key}\ntls-ca-cert-file {tls.ca_cert}\n"
            "tls-auth-clients no\n")
        self.config.write_text(
            f"bind {host}\n{listen}protected-mode yes\ndir {workdir}\n"
            'save ""\nappendonly no\ndaemonize no\nloglevel warning\n'
            f"logfile {workdir / 'redis.log'}\n"
            # The gate's user: its keys and channel only, no dangerous commands.
            f"user {USER} on >{PASSWORD} ~portcullis:* &portcullis:* "
            "+@read +@write +@pubsub +@transaction +eval +ping -@dangerous\n"
            f"user {ADMIN_USER} on >{ADMIN_PASSWORD} ~* &* +@all\n"
            "user default off\n")
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'redis' if self.tls is None else 'rediss'}://{self.host}:{self.port}/0"

    def start(self) -> RedisServer:
        self.process = subprocess.Popen([*self.run_in, self.binary, str(self.config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(lambda: self.process.poll() is not None or self._answers(), 10,
                   "redis-server to answer", interval=0.05)
        if self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited: {self.process.stderr.read().decode()}"
                               f"{(self.workdir / 'redis.log').read_text()}")
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def pause(self) -> None:
        """The server stops answering but keeps its connections: a hung server."""
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def _answers(self) -> bool:
        try:
            return self.cli("PING") == "PONG"
        except subprocess.CalledProcessError:
            return False

    def cli(self, *command: str, admin: bool = False) -> str:
        """One command through redis-cli as the gate's user (or the admin); its output."""
        user, password = (ADMIN_USER, ADMIN_PASSWORD) if admin else (USER, PASSWORD)
        result = subprocess.run(
            [*self.run_in, "redis-cli", "-h", self.host, "-p", str(self.port), "--user", user,
             "--pass", password, "--no-auth-warning",
             *([] if self.tls is None else ["--tls", "--cacert", str(self.tls.ca_cert)]),
             *command],
            capture_output=True, text=True, timeout=10, check=True)
        return result.stdout.strip()

    def settings(self, **overrides) -> dict:
        """The gate's reputation section for this server."""
        redis = {"url": self.url, "username": USER, "password_file": str(self.password_file),
                 "timeout": 0.3}
        if self.tls is not None:
            redis["ca_file"] = str(self.tls.ca_cert)
        redis.update(overrides)
        return {"store": "redis", "redis": redis}

    def stop(self) -> None:
        if self.process is not None:
            try:
                os.kill(self.process.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        stop_process(self.process)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
