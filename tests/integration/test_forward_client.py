"""The backend learns who the client is, and every message says where it came from.

Against a real Postfix that offers XFORWARD and XCLIENT to loopback, refuses one client
address by a check_client_access rule, and holds mail from held@outside.test so that
postcat shows what it recorded about the client: each backend.forward_client mode, the
Received header, the size limit with it, pooled connections shared by two clients,
IPv6 clients. Against the fault backend: an introduction refused or cut off gives the
client 4xx, and a mode the backend does not offer fails closed.
"""

from __future__ import annotations

import re
import smtplib
import ssl
import subprocess
import time

import pytest

from tests.support.fault_backend import Fault, FaultBackend
from tests.support.gate import GateProcess
from tests.support.postfix import PostfixBackend, as_sent
from tests.support.tools import free_port

REJECTED, ACCEPTED, OTHER = "127.0.0.77", "127.0.0.78", "127.0.0.79"
HELO = "client.example"
MESSAGE = b"Subject: who\r\n\r\n.a dotted line\r\nbody\r\n"
XFORWARD = "XFORWARD NAME ADDR PROTO HELO SOURCE PORT IDENT"  # as Postfix 3.7 offers them
XCLIENT = "XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT"
DOWN = (451, b"4.4.1 Mail server temporarily unavailable, try later")
ACCESS_DENIED = (554, f"5.7.1 <unknown[{REJECTED}]>: Client host rejected: Access denied".encode())
DATE = r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}"


@pytest.fixture(scope="module")
def postfix():
    backend = PostfixBackend(xforward_hosts="127.0.0.0/8", xclient_hosts="127.0.0.0/8",
                             client_access={f"{REJECTED}/32": "REJECT"})
    hold = backend.postmap("hold_senders", {"held@outside.test": "HOLD"})
    backend.postconf({"smtpd_sender_restrictions": f"check_sender_access {hold}",
                      "inet_protocols": "all"})  # takes IPv6 client addresses too
    with backend:
        yield backend


@pytest.fixture
def backend(postfix):
    postfix.reset()
    return postfix


@pytest.fixture(scope="module")
def gates(postfix, tmp_path_factory):
    """gates(mode, **overrides): a running gate with one worker, so one backend pool."""
    running: dict[str, GateProcess] = {}

    def gate(mode: str, ipv6: bool = False, **overrides) -> GateProcess:
        key = f"{mode} {ipv6} {overrides}"
        if key not in running:
            started = GateProcess(tmp_path_factory.mktemp(mode), f"127.0.0.1:{postfix.port}",
                                  workers=1, backend={"forward_client": mode}, **overrides)
            if ipv6:
                started.port6 = free_port("::1")
                started.settings["listen"].append(f"[::1]:{started.port6}")
                started.write_config()
            running[key] = started.start()
        return running[key]

    yield gate
    for started in running.values():
        started.stop()


def connect(gate, source=ACCEPTED, helo=HELO, ehlo=True, starttls=False) -> smtplib.SMTP:
    host, port = ("::1", gate.port6) if ":" in source else ("127.0.0.1", gate.port)
    client = smtplib.SMTP(host, port, local_hostname=helo, source_address=(source, 0), timeout=15)
    if starttls:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        client.starttls(context=context)
    client.ehlo() if ehlo else client.helo()
    return client


def send(gate, sender, message=MESSAGE, **how) -> tuple[dict, int]:
    """One message to alice: the refused recipients ({} when delivered), the client port."""
    with connect(gate, **how) as client:
        port = client.sock.getsockname()[1]
        try:
            return client.sendmail(sender, ["alice@example.test"], message), port
        except smtplib.SMTPRecipientsRefused as refused:
            return refused.recipients, port


def logged(backend, pattern: str, timeout: float = 10) -> re.Match:
    """The first line of Postfix's log matching `pattern`, waiting for it to be written."""
    deadline = time.monotonic() + timeout
    while (match := re.search(pattern, backend.log(), re.MULTILINE)) is None:
        assert time.monotonic() < deadline, f"no {pattern!r} in the backend log:\n{backend.log()}"
        time.sleep(0.1)
    return match


def queue_id(backend, sender) -> str:
    """The queue id of the message from `sender` that the backend delivered."""
    return logged(backend, rf"(\w+): from=<{re.escape(sender)}>").group(1)


def client_line(backend, queue_id) -> str:
    """What smtpd logged as the client of a message: "client=NAME[ADDR]..."."""
    return logged(backend, rf"smtpd\[\d+\]: {queue_id}: (client=.*)$").group(1)


def held_record(backend) -> tuple[str, dict[str, str]]:
    """The queue id and the named attributes (postcat) of the one held message."""
    deadline = time.monotonic() + 10
    while not (held := backend.queued_ids(("hold",))):
        assert time.monotonic() < deadline, "no held message"
        time.sleep(0.1)
    output = subprocess.run(["postcat", "-c", str(backend.config_dir), "-q", held[0]],
                            capture_output=True, text=True, check=True, timeout=30).stdout
    return held[0], dict(line.removeprefix("named_attribute: ").split("=", 1)
                         for line in output.splitlines() if line.startswith("named_attribute: "))


def gate_received(delivered: bytes) -> str:
    """The gate's Received header, unfolded; it must come right below the backend's."""
    head = delivered.split(b"\n\n", 1)[0].decode()
    fields = re.split(r"\n(?![ \t])", head)
    received = [number for number, field in enumerate(fields) if field.startswith("Received:")]
    assert "(Postfix)" in fields[received[0]] and "(Portcullis)" in fields[received[1]]
    assert all(len(line) <= 78 for line in fields[received[1]].split("\n"))
    return " ".join(fields[received[1]].split())


def logged_session(gate, session_id: str) -> bool:
    """Whether the gate's log line of a session carries this id."""
    for _ in range(50):
        if any(session_id in line.values() for line in gate.session_lines()):
            return True
        time.sleep(0.1)
    return False


# --- each mode against Postfix ------------------------------------------------------------

# mode: (the client Postfix's rules judge, what smtpd logs as the client)
MODES = {
    "auto": (ACCEPTED, f"client=unknown[{ACCEPTED}]"),
    "xclient": (ACCEPTED, f"client=unknown[{ACCEPTED}]"),
    "xforward": ("127.0.0.1", f"client=unknown[127.0.0.1], orig_client=unknown[{ACCEPTED}]"),
    "off": ("127.0.0.1", "client=unknown[127.0.0.1]"),
}


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_tells_the_backend_what_it_should(mode, backend, gates):
    gate = gates(mode)
    judged, logged_client = MODES[mode]
    told = mode != "off"

    refused, port = send(gate, "held@outside.test")
    assert refused == {}
    held, record = held_record(backend)
    assert (record["log_client_address"], record["log_client_port"], record["log_helo_name"],
            record["log_protocol_name"]) == (
        (ACCEPTED, str(port), HELO, "ESMTP") if told else
        ("127.0.0.1", record["client_port"], "mx.example.test", "ESMTP"))
    assert record["client_address"] == judged
    assert client_line(backend, held) == logged_client

    # The backend's client rule refuses REJECTED only when it judges the real client.
    refused, _ = send(gate, f"{mode}-rejected@outside.test", source=REJECTED)
    if judged == ACCEPTED:
        assert refused == {"alice@example.test": ACCESS_DENIED}
        line = logged(backend, rf"reject: RCPT from unknown\[{REJECTED}\]: .* "
                               rf"from=<{mode}-rejected@outside.test> .*").group(0)
        assert line.endswith(f"proto=ESMTP helo=<{HELO}>")
    else:
        assert refused == {}
    assert send(gate, f"{mode}-accepted@outside.test")[0] == {}
    expected = 1 if judged == ACCEPTED else 2
    assert len(backend.wait_for("alice", expected)) == expected


def test_xclient_for_a_client_that_said_helo(backend, gates):
    assert send(gates("xclient"), "held@outside.test", ehlo=False)[0] == {}
    _, record = held_record(backend)
    assert (record["log_helo_name"], record["log_protocol_name"]) == (HELO, "SMTP")


def test_auto_takes_xforward_when_xclient_is_not_offered(backend, tmp_path):
    backend.postconf({"smtpd_authorized_xclient_hosts": ""})
    backend.reload()
    try:
        with GateProcess(tmp_path, f"127.0.0.1:{backend.port}", workers=1) as gate:
            assert send(gate, "fallback@outside.test", source=REJECTED)[0] == {}
        assert client_line(backend, queue_id(backend, "fallback@outside.test")) == (
            f"client=unknown[127.0.0.1], orig_client=unknown[{REJECTED}]")
    finally:
        backend.postconf({"smtpd_authorized_xclient_hosts": "127.0.0.0/8"})
        backend.reload()


@pytest.mark.parametrize("mode", ["xclient", "xforward"])
def test_an_ipv6_client(mode, backend, gates):
    assert send(gates(mode, ipv6=True), f"{mode}-v6@outside.test", source="::1")[0] == {}
    assert client_line(backend, queue_id(backend, f"{mode}-v6@outside.test")) == MODES[mode][1].replace(
        f"[{ACCEPTED}]", "[::1]")
    assert "from client.example ([IPv6:::1]) by" in gate_received(backend.wait_for("alice")[0])


# --- the Received header ----------------------------------------------------------------

@pytest.mark.parametrize("starttls", [False, True], ids=["plain", "starttls"])
def test_received_header(starttls, backend, gates):
    gate = gates("auto")
    assert send(gate, "trace@outside.test", starttls=starttls)[0] == {}
    delivered = backend.wait_for("alice")[0]
    assert as_sent(delivered) == MESSAGE
    tls = r" \(using TLSv1\.[23] with cipher [\w-]+\)" if starttls else ""
    received = re.fullmatch(
        rf"Received: from client\.example \(\[127\.0\.0\.78\]\){tls} by mx\.example\.test "
        rf"\(Portcullis\) with ESMTP{'S' if starttls else ''} id (\S+); {DATE}",
        gate_received(delivered))
    assert received and logged_session(gate, received.group(1))


def message_of(size: int) -> bytes:
    head = b"Subject: big\r\n\r\n"
    lines, rest = divmod(size - len(head) - 2, 80)  # the last line: rest octets and CRLF
    return head + (b"x" * 78 + b"\r\n") * lines + b"z" * rest + b"\r\n"


def test_the_size_limit_counts_the_header(backend, gates):
    limit = 4096
    gate = gates("auto", limits={"pregreet_delay": 0, "max_message_size": limit})
    with connect(gate) as client:
        # fits without the header, not with it: refused, declared or not
        assert client.docmd(f"MAIL FROM:<big@outside.test> SIZE={limit - 20}")[0] == 552
        client.mail("big@outside.test")
        client.rcpt("alice@example.test")
        code, text = client.data(message_of(limit - 20))
        assert (code, text[:5]) == (552, b"5.3.4")
        assert client.sendmail("small@outside.test", ["alice@example.test"],
                               message_of(limit - 400)) == {}
    delivered = backend.wait_for("alice")
    time.sleep(1)
    assert len(backend.messages("alice")) == 1 and b"small@outside.test" in delivered[0]
    assert len(as_sent(delivered[0])) == limit - 400
    backend.assert_no_bounce(settle=1)
    line = next(line for line in reversed(gate.session_lines()) if line["mail"])
    assert [mail["reply"][:9] for mail in line["mail"]] == ["552 5.3.4", "250 2.0.0"]
    assert line["labels"]["SIZE"] == 2


# --- pooled backend connections -----------------------------------------------------------

@pytest.mark.parametrize("mode", ["xclient", "xforward"])
def test_two_clients_on_pooled_connections_never_see_each_other(mode, backend, gates):
    gate = gates(mode)
    a = connect(gate, ACCEPTED, "a.example")
    b = connect(gate, OTHER, "b.example")
    try:
        def message(client, sender):
            client.mail(sender)
            assert client.rcpt("alice@example.test")[0] == 250
            return lambda: client.data(f"Subject: {sender}\r\n\r\nx\r\n".encode())[0]
        # a and b open transactions side by side (two backend connections), then each
        # sends a second message, on the connection the other client used last.
        finish_a1, finish_b1 = message(a, f"a1-{mode}@o.test"), message(b, f"b1-{mode}@o.test")
        assert (finish_a1(), finish_b1()) == (250, 250)
        assert message(a, f"a2-{mode}@o.test")() == 250
        assert message(b, f"b2-{mode}@o.test")() == 250
    finally:
        a.close()
        b.close()
    carried: dict[str, set[str]] = {}  # backend smtpd process -> the clients it served
    for who, address in (("a", ACCEPTED), ("b", OTHER)):
        for number in (1, 2):
            sender = f"{who}{number}-{mode}@o.test"
            message = queue_id(backend, sender)
            assert client_line(backend, message) == MODES[mode][1].replace(ACCEPTED, address)
            smtpd = logged(backend, rf"smtpd\[(\d+)\]: {message}: client=").group(1)
            carried.setdefault(smtpd, set()).add(who)
    # One backend connection (an smtpd process serves one at a time) carried both.
    assert {"a", "b"} in carried.values(), carried
    messages = backend.wait_for("alice", 4)
    for delivered in messages:
        sender = re.search(rb"Subject: (\S+)", delivered).group(1).decode()
        address, helo = (ACCEPTED, "a.example") if sender[0] == "a" else (OTHER, "b.example")
        assert f"from {helo} ([{address}]) by mx.example.test" in gate_received(delivered)
        if mode == "xclient":  # the backend's own Received names the client too
            assert f"Received: from {helo} (unknown [{address}])".encode() in delivered


# --- faults -------------------------------------------------------------------------------

def attempt(gate) -> tuple[int, bytes]:
    with connect(gate) as client:
        client.mail("s@outside.test")
        return client.rcpt("alice@example.test")


@pytest.mark.parametrize("offered", [XFORWARD, XCLIENT], ids=["xforward", "xclient"])
def test_a_refused_or_cut_introduction_gives_the_client_4xx(offered, tmp_path):
    verb = offered.split()[0]
    wrong_success = "220 2.0.0 Ready" if verb == "XFORWARD" else "250 2.0.0 Ok"
    faults = [Fault.reply("451 4.3.0 Try later"), Fault.reply("550 5.7.0 Not authorized"),
              Fault.reply("421 4.3.2 Shutting down"), Fault.reply(wrong_success),
              Fault.hangup(), Fault.malformed()]
    with FaultBackend(extensions=[offered]) as backend, GateProcess(
            tmp_path, f"127.0.0.1:{backend.port}", workers=1) as gate:
        for fault in faults:  # no transaction succeeds meanwhile: no pooled connection
            backend.plan(verb.lower(), fault)
            assert attempt(gate) == DOWN, fault
        assert backend.deliveries == [] and len(backend.fired) == len(faults)
        refused, port = send(gate, "s@outside.test", ehlo=False)
        assert refused == {}
    [delivery] = backend.deliveries
    introduction = f"{verb} NAME=[UNAVAILABLE] ADDR={ACCEPTED} PORT={port} PROTO=SMTP HELO={HELO}"
    assert delivery.forward == [introduction]
    assert delivery.trace.startswith(f"Received: from {HELO} ([{ACCEPTED}]) by".encode())
    assert delivery.data == MESSAGE.replace(b"\r\n.a", b"\r\n..a")  # dot-stuffed, as sent


@pytest.mark.parametrize("mode, expected", [("xclient", DOWN), ("xforward", DOWN),
                                            ("auto", (250, b"2.1.5 Ok")), ("off", (250, b"2.1.5 Ok"))])
def test_a_required_extension_the_backend_lacks_fails_closed(mode, expected, tmp_path):
    with FaultBackend() as backend, GateProcess(tmp_path, f"127.0.0.1:{backend.port}",
                                                workers=1, backend={"forward_client": mode}) as gate:
        assert attempt(gate) == expected
        if expected == DOWN:
            assert "not offered (backend.forward_client: " in gate.log_text()
