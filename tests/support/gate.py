"""Run the real gate (`portcullis serve`) as a subprocess for integration tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

import yaml

from tests.support.tools import free_port, port_accepts, wait_until

RECIPIENTS = "alice@example.test\nbob@example.test\ncarol@example.test\n"


def merged(base: dict, overrides: dict) -> dict:
    """base with overrides applied, nested mappings merged key by key."""
    result = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


class GateProcess:
    """A gate on 127.0.0.1:<free port> relaying to `backend` ("host:port")."""

    def __init__(self, directory: Path, backend_server: str, **overrides):
        self.directory = directory
        self.port = free_port()
        self.recipients = directory / "recipients"
        self.recipients.write_text(RECIPIENTS)
        self.config_path = directory / "portcullis.yaml"
        self.log_path = directory / "gate.log"
        self.settings = merged({
            "hostname": "mx.example.test",
            "listen": [f"127.0.0.1:{self.port}"],
            "relay_domains": ["example.test"],
            "workers": 2,
            "recipients": {"file": str(self.recipients)},
            "backend": {"servers": [backend_server], "connect_timeout": 2, "command_timeout": 3,
                        "data_timeout": 3},
            "tls": {"generated_dir": str(directory / "tls")},
            "state_dir": str(directory / "state"),
            "limits": {"pregreet_delay": 0},
        }, overrides)
        self.write_config()
        self.process: subprocess.Popen | None = None

    def write_config(self, settings: dict | None = None) -> None:
        self.config_path.write_text(yaml.safe_dump(settings or self.settings))

    def start(self) -> GateProcess:
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "portcullis.cli", "serve", "-c", str(self.config_path)],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(lambda: port_accepts("127.0.0.1", self.port) or self.process.poll() is not None,
                       15, "the gate to listen")
        except TimeoutError:
            self.stop()
            raise
        if self.process.poll() is not None:
            raise RuntimeError(f"the gate exited at start:\n{self.log_text()}")
        time.sleep(0.5)  # workers import and report in
        return self

    def reload(self) -> None:
        self.process.send_signal(signal.SIGHUP)
        time.sleep(1.0)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.process:
            self.log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[dict]:
        """Every log line, parsed: each one is a JSON object (a stray line fails the test)."""
        return [json.loads(line) for line in self.log_text().splitlines()]

    def session_lines(self) -> list[dict]:
        return [line for line in self.log_lines() if line["message"] == "session"]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
