"""The gate before any parsing: caps, rates, pre-greet, stress mode, allowlist, reload, CLI."""

import smtplib
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack

import pytest

from tests.support.gate import GateProcess
from tests.support.tools import free_port, wait_until


def open_idle(gate, source: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gate.port), timeout=10, source_address=(source, 0))
    return sock


def first_line(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1024)
        if not chunk:
            break
        data += chunk
    return data


def deliver(gate, source: str) -> int:
    with smtplib.SMTP("127.0.0.1", gate.port, local_hostname="client.test",
                      source_address=(source, 0), timeout=20) as client:
        refused = client.sendmail("s@outside.test", ["alice@example.test"], b"Subject: t\r\n\r\nx\r\n")
        return 250 if refused == {} else 550


@pytest.fixture
def backend(postfix_backend):
    return f"127.0.0.1:{postfix_backend.port}"


def test_early_talker_refused_and_patient_client_served(backend, tmp_path):
    with GateProcess(tmp_path, backend, limits={"pregreet_delay": 1.0}) as gate:
        with open_idle(gate, "127.0.0.20") as sock:
            sock.sendall(b"EHLO hasty.test\r\n")
            assert first_line(sock).startswith(b"554 5.5.1")
        with open_idle(gate, "127.0.0.21") as sock:
            started = time.monotonic()
            banner = first_line(sock)
            assert banner.startswith(b"220 ") and time.monotonic() - started >= 0.9
        started = time.monotonic()
        with open_idle(gate, "127.0.0.21") as sock:  # the pass is remembered
            assert first_line(sock).startswith(b"220 ")
            assert time.monotonic() - started < 0.9
        assert deliver(gate, "127.0.0.22") == 250


def test_per_ip_cap(backend, tmp_path):
    with GateProcess(tmp_path, backend, limits={"pregreet_delay": 0, "max_connections_per_ip": 3,
                                                "max_connections_per_prefix": 100}) as gate:
        held = ExitStack()
        with held:
            for _ in range(3):
                sock = held.enter_context(open_idle(gate, "127.0.0.30"))
                assert first_line(sock).startswith(b"220 ")
            with open_idle(gate, "127.0.0.30") as extra:
                assert first_line(extra).startswith(b"421 4.7.0")
            assert deliver(gate, "127.0.0.31") == 250  # another address is served meanwhile
        time.sleep(0.5)  # the worker reports the closed sessions
        assert deliver(gate, "127.0.0.30") == 250


def test_per_prefix_cap(backend, tmp_path):
    with GateProcess(tmp_path, backend, limits={"pregreet_delay": 0, "max_connections_per_ip": 10,
                                                "max_connections_per_prefix": 2}) as gate, \
            open_idle(gate, "127.0.5.1") as a, open_idle(gate, "127.0.5.2") as b:
        assert first_line(a).startswith(b"220") and first_line(b).startswith(b"220")
        with open_idle(gate, "127.0.5.3") as c:
            assert first_line(c).startswith(b"421 4.7.0")
        assert deliver(gate, "127.0.6.1") == 250


def test_per_ip_connection_rate(backend, tmp_path):
    with GateProcess(tmp_path, backend, limits={"pregreet_delay": 0, "connection_rate_per_ip": 0.1,
                                                "connection_burst_per_ip": 3}) as gate:
        replies = []
        for _ in range(5):
            with open_idle(gate, "127.0.0.40") as sock:
                replies.append(first_line(sock)[:3])
        assert replies == [b"220", b"220", b"220", b"421", b"421"]
        assert deliver(gate, "127.0.0.41") == 250


def test_allowlist_skips_caps_and_pregreet(backend, tmp_path):
    with GateProcess(tmp_path, backend, allowlist=["127.0.0.50/32"],
                     limits={"pregreet_delay": 5, "max_connections_per_ip": 1}) as gate, \
            open_idle(gate, "127.0.0.50") as a, open_idle(gate, "127.0.0.50") as b:
            started = time.monotonic()
            assert first_line(a).startswith(b"220") and first_line(b).startswith(b"220")
            assert time.monotonic() - started < 2


def active_connections(gate) -> float:
    listen = gate.settings["metrics"]["listen"]
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("portcullis_active_connections "):
                return float(line.split()[1])
    raise AssertionError("no active connections gauge")


def test_stress_mode_tightens_idle_timeout(backend, tmp_path):
    with GateProcess(tmp_path, backend, metrics={"listen": f"127.0.0.1:{free_port()}"}, limits={
            "pregreet_delay": 0, "max_connections": 10, "stress_threshold": 0.5,
            "stress_command_timeout": 3, "command_timeout": 30,
            "max_connections_per_ip": 20, "max_connections_per_prefix": 20}) as gate:
        wait_until(lambda: active_connections(gate) == 0, 10, "the start-up probe to close")
        held = ExitStack()
        with held:
            for _ in range(4):  # below the threshold of 5: normal timeouts
                assert first_line(held.enter_context(open_idle(gate, "127.0.0.60"))).startswith(b"220")
            with open_idle(gate, "127.0.0.61") as stressed:  # the fifth: stress mode
                assert first_line(stressed).startswith(b"220")
                started = time.monotonic()
                assert first_line(stressed).startswith(b"421 4.4.2")
                assert 2 < time.monotonic() - started < 8
            # Connections admitted under stress also get the short timeout: fill the cap fast.
            for _ in range(6):
                assert first_line(held.enter_context(open_idle(gate, "127.0.0.62"))).startswith(b"220")
            with open_idle(gate, "127.0.0.63") as over_cap:
                assert first_line(over_cap).startswith(b"421 4.7.0")


def test_sighup_reloads_without_dropping_connections(backend, tmp_path):
    with GateProcess(tmp_path, backend) as gate:
        gate.recipients.write_text("alice@example.test\n")
        gate.reload()
        with smtplib.SMTP("127.0.0.1", gate.port, local_hostname="client.test", timeout=20) as held:
            held.ehlo()
            held.mail("s@outside.test")
            assert held.rcpt("carol@example.test")[0] == 550
            gate.recipients.write_text("alice@example.test\ncarol@example.test\n")
            gate.settings["relay_domains"] = ["example.test", "example.org"]
            gate.write_config()
            gate.reload()
            assert held.noop()[0] == 250  # the open session survived the reload
        with smtplib.SMTP("127.0.0.1", gate.port, local_hostname="client.test", timeout=20) as fresh:
            fresh.ehlo()
            fresh.mail("s@outside.test")
            assert fresh.rcpt("carol@example.test")[0] == 250  # the new list is in force
            assert fresh.rcpt("x@example.org")[0] != 554  # and the new relay domain
        assert "exited" not in gate.log_text()

        gate.config_path.write_text(gate.config_path.read_text() + "log_level: loud\n")
        gate.reload()
        assert "reload refused" in gate.log_text() and "key 'log_level'" in gate.log_text()
        assert deliver(gate, "127.0.0.70") == 250  # still serving with the old configuration


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "portcullis.cli", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def test_config_error_names_key_and_line_without_traceback(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("hostname: mx.test\nrelay_domains: [example.test]\n"
                      "backend:\n  servers: ['10.0.0.1:25']\nlimits:\n  max_recipients: many\n")
    for command in ("check-config", "serve"):
        result = run_cli(command, "-c", str(config))
        assert result.returncode == 2
        assert f"{config} line 6: key 'limits.max_recipients': must be an integer" in result.stderr
        assert "Traceback" not in result.stderr


def test_check_config_accepts_a_good_file_and_checks_the_recipient_list(tmp_path):
    recipients = tmp_path / "recipients"
    recipients.write_text("alice@example.test\n")
    config = tmp_path / "good.yaml"
    config.write_text(f"relay_domains: [example.test]\nbackend: {{servers: ['10.0.0.1:25']}}\n"
                      f"recipients: {{file: {recipients}}}\n")
    result = run_cli("check-config", "-c", str(config))
    assert result.returncode == 0 and "OK" in result.stdout
    recipients.write_text("alice@example.test\nnot an address\n")
    result = run_cli("check-config", "-c", str(config))
    assert result.returncode == 2 and "line 2" in result.stderr


def test_session_deadline_and_minimum_data_rate(backend, tmp_path):
    with GateProcess(tmp_path, backend, limits={"pregreet_delay": 0, "session_timeout": 3,
                                                "min_data_rate": 1000}) as gate, \
            open_idle(gate, "127.0.0.90") as sock:
        assert first_line(sock).startswith(b"220")
        started = time.monotonic()
        for _ in range(10):  # busy, never idle, but past the deadline
            sock.sendall(b"NOOP\r\n")
            first_line(sock)
            time.sleep(0.5)
            if time.monotonic() - started > 3:
                break
        sock.sendall(b"NOOP\r\n")
        assert b"421 4.4.2" in sock.recv(1024) + sock.recv(1024)

    with GateProcess(tmp_path, backend, limits={"pregreet_delay": 0, "min_data_rate": 1000,
                                                "command_timeout": 30}) as gate, \
            smtplib.SMTP("127.0.0.1", gate.port, local_hostname="client.test",
                         source_address=("127.0.0.91", 0), timeout=30) as client:
        client.ehlo()
        client.mail("s@outside.test")
        client.rcpt("alice@example.test")
        assert client.docmd("DATA")[0] == 354
        started = time.monotonic()
        reply = b""
        while time.monotonic() - started < 20 and not reply:
            client.send(b"x\r\n")  # 3 bytes a second, far below 1000
            time.sleep(1)
            client.sock.settimeout(0.01)
            try:
                reply = client.sock.recv(1024)
            except TimeoutError:
                pass
        assert reply.startswith(b"421 4.4.2")
    assert "DATA_TOO_SLOW" in gate.log_text()


def metric(gate, name: str) -> float:
    """A sample's value from /metrics (0 when absent), e.g. name='x_total{table="y"}'."""
    listen = gate.settings["metrics"]["listen"]
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def test_full_per_client_tables_evict_and_count_it(backend, tmp_path):
    # 150 clients, each in a /24 of its own, passing the pre-greet wait and missing one
    # recipient, against tables of 100: the oldest go, in the admission process and in
    # the worker alike.
    with GateProcess(tmp_path, backend, workers=1, metrics={"listen": f"127.0.0.1:{free_port()}"},
                     limits={"pregreet_delay": 0.05, "max_tracked_clients": 100}) as gate:
        for host in range(1, 151):
            with smtplib.SMTP("127.0.0.1", gate.port, local_hostname="client.test",
                              source_address=(f"127.{host}.7.1", 0), timeout=20) as client:
                client.ehlo()
                client.mail("s@outside.test")
                assert client.rcpt(f"nobody{host}@example.test")[0] == 550
        wait_until(lambda: metric(gate, 'portcullis_state_evictions_total{table="pregreet"}') >= 50,
                   10, "the admission process to count its evictions")
        wait_until(lambda: metric(gate, 'portcullis_state_evictions_total{table="harvest"}') >= 50,
                   10, "the worker to report its evictions")
        assert deliver(gate, "127.0.7.200") == 250
