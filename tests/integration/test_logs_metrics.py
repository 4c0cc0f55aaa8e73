"""The log an admin greps agrees with the metrics, through a real gate and Postfix.

A scripted mix of traffic from distinct 127.0.0.x addresses (deliveries, unknown
recipients, relay denials, pre-greet talkers, per-IP cap refusals past the log's burst,
a harvest ending in a ban, protocol errors) goes through a real gate. Every log line is
JSON; the per-label counts summed over them (session lines, admission refusals, and the
summaries of suppressed refusal lines) equal the deltas of
portcullis_decisions_total{reason=} between before and after. Then the endpoint:
/metrics passes `promtool check metrics`, /healthz follows workers and the backend,
unknown paths are 404.
"""

import json
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from contextlib import ExitStack

from portcullis.metrics import REASONS
from prometheus_client.parser import text_string_to_metric_families

from tests.support.fault_backend import FaultBackend
from tests.support.gate import GateProcess
from tests.support.tools import free_port, wait_until

SETTINGS = {
    "limits": {"pregreet_delay": 0.3, "max_connections_per_ip": 2},
    # A harvest is banned after 4 misses, with no delays; 127.0.0.0/24 is shared by
    # every client here, so its own thresholds stay out of reach.
    "dha": {"tarpit_after": 2, "suspect_after": 3, "ban_after": 4, "tarpit_step": 0,
            "tarpit_max": 0, "suspect_delay": 0, "prefix_tarpit_after": 1000,
            "prefix_suspect_after": 1000, "prefix_ban_after": 1000},
}
CAP_REFUSALS = 40  # more than the refusal log's burst of 20


def get(gate, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{gate.settings['metrics']['listen']}{path}",
                                    timeout=15) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def decisions(gate) -> Counter:
    _, text = get(gate, "/metrics")
    counts = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "portcullis_decisions_total":
                counts[sample.labels["reason"]] = int(sample.value)
    return counts


def settled(gate) -> Counter:
    """The decision counts once the workers' reports have stopped changing them."""
    last = None
    while True:
        time.sleep(1.5)  # workers report every second
        now = decisions(gate)
        if now == last:
            return now
        last = now


def client(gate, source: str) -> smtplib.SMTP:
    session = smtplib.SMTP("127.0.0.1", gate.port, local_hostname="client.test",
                           source_address=(source, 0), timeout=20)
    session.ehlo()
    return session


def connect(gate, source: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gate.port), timeout=10,
                                    source_address=(source, 0))


def exchange(sock: socket.socket, command: bytes) -> bytes:
    sock.sendall(command)
    return sock.recv(1024)


def drive_traffic(gate) -> None:
    with client(gate, "127.0.0.11") as session:  # deliveries
        assert session.sendmail("s@outside.test", ["alice@example.test"], b"Subject: 1\r\n\r\nx\r\n") == {}
        assert session.sendmail("s@outside.test", ["bob@example.test"], b"Subject: 2\r\n\r\nx\r\n") == {}
    with client(gate, "127.0.0.12") as session:  # an unknown recipient beside a known one
        session.mail("s@outside.test")
        assert session.rcpt("nobody@example.test")[0] == 550
        assert session.rcpt("carol@example.test")[0] == 250
    with client(gate, "127.0.0.13") as session:  # relay denials
        session.mail("s@outside.test")
        assert session.rcpt("x@elsewhere.test")[0] == 554
        assert session.rcpt("y@elsewhere.test")[0] == 554
    for source in ("127.0.0.14", "127.0.0.15"):  # pre-greet talkers
        with connect(gate, source) as sock:
            assert exchange(sock, b"EHLO early.test\r\n").startswith(b"554 5.5.1")
    with connect(gate, "127.0.0.19"):  # hangs up during the pre-greet wait
        pass
    with ExitStack() as held:  # per-IP cap: two held, the rest refused
        for _ in range(2):
            assert held.enter_context(connect(gate, "127.0.0.16")).recv(1024).startswith(b"220")
        for _ in range(CAP_REFUSALS):
            with connect(gate, "127.0.0.16") as sock:
                assert sock.recv(1024).startswith(b"421 4.7.0")
    with connect(gate, "127.0.0.18") as sock:  # protocol errors
        assert sock.recv(1024).startswith(b"220")
        assert exchange(sock, b"FROB\r\n").startswith(b"500")
        assert exchange(sock, b"RCPT TO:<alice@example.test>\r\n").startswith(b"503")
        assert exchange(sock, b"EHLO client.test\r\n").startswith(b"250")
        assert exchange(sock, b"MAIL FROM:nonsense\r\n").startswith(b"501")
        assert exchange(sock, b"QUIT\r\n").startswith(b"221")
    harvest(gate, "127.0.0.17")


def harvest(gate, source: str) -> None:
    """Unknown recipients until the gate bans the client, then the gate refuses it."""
    with client(gate, source) as session:
        session.mail("s@outside.test")
        for n in range(10):
            code, _ = session.rcpt(f"guess{n}@example.test")
            if code == 421:
                break
        else:
            raise AssertionError("the harvest was never banned")

    def refused() -> bool:  # the gate sees the worker's ban within reputation.sync_interval
        with connect(gate, source) as sock:
            return sock.recv(1024).startswith(b"421 4.7.1")

    wait_until(refused, 10, "the gate to refuse the banned client", interval=0.3)


def label_counts(lines: list[dict]) -> Counter:
    counts = Counter()
    for line in lines:
        counts.update(line.get("labels", {}))
    return counts


def test_label_counts_in_the_log_agree_with_the_metrics(postfix_backend, tmp_path):
    gate = GateProcess(tmp_path, f"127.0.0.1:{postfix_backend.port}",
                       metrics={"listen": f"127.0.0.1:{free_port()}"}, **SETTINGS)
    with gate:
        before = settled(gate)
        logged_before = len(gate.log_lines())
        drive_traffic(gate)
        after = settled(gate)
    lines = gate.log_lines()  # all JSON; stopping the gate wrote the last summary
    logged = label_counts(lines[logged_before:])
    delta = Counter({label: after[label] - before[label] for label in after})
    assert +logged == +delta
    for label in ("UNKNOWN_RCPT", "RELAY_DENIED", "PREGREET", "CONN_CAP_IP", "DHA_BAN",
                  "BANNED", "UNKNOWN_COMMAND", "BAD_SEQUENCE", "SYNTAX", "HANGUP"):
        assert logged[label] > 0, label
    assert set(logged) <= set(REASONS)

    for line in lines:
        assert {"time", "level", "process", "logger", "message"} <= set(line)
    sessions = [line for line in lines if line["message"] in ("session", "refused")]
    for line in sessions:
        assert {"session", "client", "port", "start", "labels"} <= set(line)
    ids = [line["session"] for line in sessions]
    assert len(set(ids)) == len(ids)
    assert len({i.rsplit("-", 1)[0] for i in ids}) == 1  # all given by the one gate
    processes = {line["process"] for line in sessions}
    assert "gate" in processes and any(p.startswith("worker-") for p in processes)
    refused = [line for line in lines if line["message"] == "refused"
               and "CONN_CAP_IP" in line["labels"]]
    assert len(refused) < CAP_REFUSALS  # bounded: the rest are in a summary line
    assert any(line["message"] == "lines suppressed" and line["level"] == "warning"
               for line in lines)


def worker_pids(gate) -> list[int]:
    children = f"/proc/{gate.process.pid}/task/{gate.process.pid}/children"
    with open(children) as f:
        return [int(pid) for pid in f.read().split()]


def test_endpoint_health_and_lint(tmp_path):
    backend = FaultBackend().start()
    running = True
    try:
        with GateProcess(tmp_path, f"127.0.0.1:{backend.port}",
                         metrics={"listen": f"127.0.0.1:{free_port()}"}) as gate:
            for path in ("/", "/nope", "/metrics/x"):
                assert get(gate, path)[0] == 404
            assert get(gate, "/healthz") == (200, '{"status": "ok"}\n')
            status, text = get(gate, "/metrics")
            assert status == 200 and "_created" not in text
            assert "portcullis_backend_up 1.0" in text
            assert 'portcullis_decisions_total{reason="DIRECTORY_TEMPFAIL"} 0.0' in text
            if shutil.which("promtool"):
                lint = subprocess.run(["promtool", "check", "metrics"], input=text, check=False,
                                      capture_output=True, text=True, timeout=60)
                assert lint.returncode == 0, lint.stdout + lint.stderr

            os.kill(worker_pids(gate)[0], signal.SIGKILL)
            wait_until(lambda: "portcullis_worker_restarts_total 1.0" in get(gate, "/metrics")[1],
                       10, "the restart to be counted", interval=0.2)
            wait_until(lambda: get(gate, "/healthz")[0] == 200, 15, "the new worker", interval=0.5)

            backend.stop()
            running = False
            time.sleep(5)  # the probe's answer is reused for 5 s
            status, text = get(gate, "/healthz")
            assert status == 503 and json.loads(text)["reason"] == "backend unreachable"
            assert "portcullis_backend_up 0.0" in get(gate, "/metrics")[1]
    finally:
        if running:
            backend.stop()


def test_the_backend_pools_hit_rate_is_counted(postfix_backend, tmp_path):
    """Messages in a row through one worker: the first opens a backend connection, the
    next ones begin on it again (the pool keeps it for 2 s), and the counters say so."""
    with GateProcess(tmp_path, f"127.0.0.1:{postfix_backend.port}", workers=1,
                     metrics={"listen": f"127.0.0.1:{free_port()}"}) as gate:
        listen = gate.settings["metrics"]["listen"]

        def counters() -> tuple[float, float]:
            with urllib.request.urlopen(f"http://{listen}/metrics", timeout=5) as response:
                samples = {sample.name: sample.value for family in
                           text_string_to_metric_families(response.read().decode())
                           for sample in family.samples}
            return (samples["portcullis_backend_connections_opened_total"],
                    samples["portcullis_backend_connections_reused_total"])

        for number in range(3):
            with smtplib.SMTP("127.0.0.1", gate.port, local_hostname="client.test",
                              timeout=30) as client:
                client.sendmail("s@outside.test", ["alice@example.test"],
                                f"Subject: pooled {number}\r\n\r\nhello\r\n")
        wait_until(lambda: sum(counters()) == 3, 10, "the worker's counters")
        assert counters() == (1, 2)
    assert len(postfix_backend.wait_for("alice")) == 3
