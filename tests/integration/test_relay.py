"""The gate relaying to a real Postfix backend, driven by real SMTP clients."""

import smtplib
import socket
import ssl
import subprocess
import time
import urllib.request

import pytest

from tests.support.gate import GateProcess
from tests.support.postfix import as_sent
from tests.support.tools import free_port


@pytest.fixture(scope="module")
def gate(postfix_backend, tmp_path_factory):
    directory = tmp_path_factory.mktemp("gate")
    with GateProcess(directory, f"127.0.0.1:{postfix_backend.port}",
                     limits={"pregreet_delay": 0, "max_message_size": 1_000_000},
                     metrics={"listen": f"127.0.0.1:{free_port()}"}) as running:
        yield running


def connect(gate, source="127.0.0.1") -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", gate.port, local_hostname="client.test",
                          source_address=(source, 0), timeout=15)
    client.ehlo()
    return client


def raw_session(gate, payload: bytes, source="127.0.0.1", wait=1.0) -> bytes:
    with socket.create_connection(("127.0.0.1", gate.port), timeout=10,
                                  source_address=(source, 0)) as sock:
        sock.recv(1024)  # banner
        sock.sendall(payload)
        deadline = time.monotonic() + wait
        received = b""
        sock.settimeout(0.3)
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                break
            received += data
        return received


MESSAGE = (
    b"From: Sender <sender@outside.test>\r\n"
    b"To: alice@example.test\r\n"
    b"Subject: byte-exact\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b".leading dot must survive\r\n"
    b"..two dots\r\n"
    b".\tdot tab\r\n"
    b"caf\xc3\xa9 \xe2\x82\xac 8-bit \xff\xfe raw\r\n"
    b"trailing spaces   \r\n"
    b"\r\n"
    b"last line\r\n"
)


def test_delivers_byte_exact_with_dot_stuffing_and_8bit(gate, postfix_backend):
    with connect(gate) as client:
        refused = client.sendmail("sender@outside.test", ["alice@example.test"], MESSAGE,
                                  mail_options=["BODY=8BITMIME"])
        assert refused == {}
    delivered = postfix_backend.wait_for("alice")
    assert as_sent(delivered[0]) == MESSAGE


def test_swaks_delivery_and_final_reply_is_the_backends(gate, postfix_backend):
    result = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{gate.port}", "--from", "s@outside.test",
         "--to", "bob@example.test", "--helo", "client.test", "--body", "hello from swaks"],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout
    final = [line for line in result.stdout.splitlines() if line.startswith("<-  250 2.0.0 Ok: queued")]
    assert final, result.stdout  # Postfix's own "queued as" reply came back
    assert b"hello from swaks" in postfix_backend.wait_for("bob")[0]


def test_unknown_and_foreign_recipients_refused_at_rcpt(gate, postfix_backend):
    with connect(gate) as client:
        client.mail("s@outside.test")
        code, text = client.rcpt("nobody@example.test")
        assert (code, text[:5]) == (550, b"5.1.1")
        code, text = client.rcpt("victim@elsewhere.test")
        assert (code, text[:5]) == (554, b"5.7.1")
        code, _ = client.rcpt("carol@example.test")
        assert code == 250
        code, _ = client.data(b"Subject: mixed\r\n\r\nonly carol\r\n")
        assert code == 250
    assert len(postfix_backend.wait_for("carol")) == 1
    time.sleep(0.5)
    assert postfix_backend.messages("alice") == [] and postfix_backend.messages("bob") == []
    postfix_backend.assert_no_bounce(settle=1)


def test_only_foreign_recipients_never_reach_the_backend(gate, postfix_backend):
    with connect(gate) as client:
        client.mail("s@outside.test")
        assert client.rcpt("x@elsewhere.test")[0] == 554
        assert client.docmd("DATA")[0] == 554
    assert "RCPT" not in postfix_backend.log() or "elsewhere.test" not in postfix_backend.log()


def test_bare_lf_smuggling_blocked(gate, postfix_backend):
    smuggle = (b"EHLO c.test\r\nMAIL FROM:<s@outside.test>\r\nRCPT TO:<alice@example.test>\r\n"
               b"DATA\r\n")
    reply = raw_session(gate, smuggle)
    assert b"354" in reply
    reply = raw_session(gate, smuggle + b"Subject: a\r\n\r\nbody\n.\nMAIL FROM:<evil@x.test>\r\n"
                        b"RCPT TO:<bob@example.test>\r\nDATA\r\nSubject: smuggled\r\n\r\n.\r\n")
    assert b"521 5.5.2" in reply
    assert b"250 2.0.0 Ok: queued" not in reply
    time.sleep(1)
    assert postfix_backend.messages("alice") == [] and postfix_backend.messages("bob") == []


def test_overlong_command_and_data_lines_refused_server_keeps_serving(gate, postfix_backend):
    reply = raw_session(gate, b"EHLO c.test\r\nNOOP " + b"A" * 2000 + b"\r\nNOOP\r\n")
    assert b"500 5.5.2" in reply and reply.rstrip().endswith(b"250 2.0.0 OK")
    with connect(gate) as client:
        client.mail("s@outside.test")
        client.rcpt("alice@example.test")
        code, text = client.data(b"Subject: long\r\n\r\n" + b"x" * 1500 + b"\r\n")
        assert (code, text[:5]) == (550, b"5.6.0")
        assert client.noop()[0] == 250
    with connect(gate) as client:
        assert client.sendmail("s@outside.test", ["alice@example.test"], b"Subject: ok\r\n\r\nfine\r\n") == {}
    assert len(postfix_backend.wait_for("alice")) == 1  # only the good message


def _gate_memory_kib(gate) -> int:
    children = subprocess.run(["pgrep", "-g", str(gate.process.pid)], capture_output=True,
                              text=True, check=True).stdout.split()
    total = 0
    for pid in children:
        with open(f"/proc/{pid}/status") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    return total


def test_size_refused_while_streaming_without_buffering(gate, postfix_backend):
    before = _gate_memory_kib(gate)
    with connect(gate) as client:
        code, _ = client.docmd("MAIL FROM:<s@outside.test> SIZE=2000000")
        assert code == 552
        client.mail("s@outside.test")
        client.rcpt("alice@example.test")
        assert client.docmd("DATA")[0] == 354
        line = b"y" * 998 + b"\r\n"
        for _ in range(20_000):  # 20 MB against a 1 MB limit
            client.send(line)
        code, text = client.docmd(".")
        assert (code, text[:5]) == (552, b"5.3.4")
        assert client.noop()[0] == 250
    growth = _gate_memory_kib(gate) - before
    assert growth < 8 * 1024, f"the gate grew by {growth} KiB while refusing 20 MB"
    time.sleep(0.5)
    assert postfix_backend.messages("alice") == []
    postfix_backend.assert_no_bounce(settle=1)


def test_starttls_injection_is_discarded(gate, postfix_backend):
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", gate.port), timeout=10) as sock:
        assert sock.recv(1024).startswith(b"220 ")
        sock.sendall(b"EHLO c.test\r\n")
        time.sleep(0.3)
        assert b"STARTTLS" in sock.recv(4096)
        sock.sendall(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
        time.sleep(0.3)
        assert sock.recv(1024).startswith(b"220 2.0.0")
        with context.wrap_socket(sock, server_hostname="mx.example.test") as tls:
            tls.sendall(b"MAIL FROM:<s@outside.test>\r\n")
            assert tls.recv(1024).startswith(b"503 5.5.1")  # injection gone, EHLO needed again
            tls.sendall(b"EHLO c.test\r\n")
            ehlo = tls.recv(4096)
            assert b"250" in ehlo and b"STARTTLS" not in ehlo
            tls.sendall(b"MAIL FROM:<s@outside.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
            time.sleep(1)
            assert b"354" in tls.recv(4096)
            tls.sendall(b"Subject: over tls\r\n\r\nsecret\r\n.\r\nQUIT\r\n")
            time.sleep(1)
            assert b"250 2.0.0 Ok: queued" in tls.recv(4096)
    assert b"secret" in postfix_backend.wait_for("bob")[0]
    line = next(s for s in reversed(gate.session_lines()) if s["tls"])
    assert "injected@evil.test" not in str(line)


def test_banner_and_vrfy_reveal_nothing(gate):
    reply = raw_session(gate, b"VRFY alice\r\nEXPN staff\r\nHELP\r\n")
    assert b"252 2.1.5" in reply and b"502 5.5.1" in reply
    with socket.create_connection(("127.0.0.1", gate.port), timeout=5) as sock:
        banner = sock.recv(1024)
    assert banner == b"220 mx.example.test ESMTP\r\n"


def test_session_log_line_and_metrics(gate, postfix_backend):
    with connect(gate, source="127.0.0.9") as client:
        client.mail("s@outside.test")
        client.rcpt("nobody@example.test")
    time.sleep(1.5)
    line = next(s for s in reversed(gate.session_lines()) if s["client"] == "127.0.0.9")
    assert line["helo"] == "client.test"
    assert line["mail"][0]["rcpts"] == [{"to": "nobody@example.test", "reply": 550,
                                         "label": "UNKNOWN_RCPT"}]
    assert "UNKNOWN_RCPT" in line["labels"] and "duration" in line and line["reply"].startswith("221")


def test_prometheus_endpoint_counts_decisions(gate, postfix_backend):
    with connect(gate) as client:
        client.sendmail("s@outside.test", ["alice@example.test"], b"Subject: m\r\n\r\nx\r\n")
        client.mail("s@outside.test")
        client.rcpt("ghost@example.test")
    time.sleep(1.5)
    listen = gate.settings["metrics"]["listen"]
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines() if line.startswith("portcullis_")}
    assert values['portcullis_decisions_total{reason="UNKNOWN_RCPT"}'] >= 1
    assert values["portcullis_messages_relayed_total"] >= 1
    assert values["portcullis_relayed_bytes_total"] > 0
    assert values["portcullis_active_connections"] == 0


def test_ipv6_listener(postfix_backend, tmp_path):
    port = free_port("::1")
    gate = GateProcess(tmp_path, f"127.0.0.1:{postfix_backend.port}", limits={"pregreet_delay": 0})
    gate.settings["listen"].append(f"[::1]:{port}")
    gate.write_config()
    with gate, smtplib.SMTP("::1", port, local_hostname="client.test", timeout=15) as client:
        assert client.sendmail("s@outside.test", ["carol@example.test"],
                               b"Subject: v6\r\n\r\nover IPv6\r\n") == {}
    assert b"over IPv6" in postfix_backend.wait_for("carol")[0]
    assert any(line["client"] == "::1" for line in gate.session_lines())
