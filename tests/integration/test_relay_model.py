"""Model-based test of the relay contract: random client transactions against random
backend faults, through the real gate, with the fault backend's record as the truth.

Hypothesis draws the messages: 1-20 recipients (valid, unknown to the backend, unknown
to the gate, outside the relay domains), RSET instead of DATA, pipelining, STARTTLS,
sizes up to several MB, and up to two faults per message at any backend step, in
every way a backend fails. Clients run side by side, each meeting only the faults
planned for its own sender. After each message the model compares what the client
was told with what the backend recorded:

- lost: the client got 250 at end-of-data, but the backend has no copy of the same
  bytes for exactly the recipients the client was told 250 at RCPT;  must be 0
- transient→5xx: a 5xx that neither local policy nor a permanent backend answer
  explains;                                                          must be 0
- duplicates: the backend kept a message whose client got no 250. The protocol cannot
  avoid these (the backend's 250 came after the gate's timeout, or garbled); they
  are counted, and each must follow such a fault at end-of-data.

PORTCULLIS_MODEL_MESSAGES sets the number of messages (default 10,000).
"""

from __future__ import annotations

import collections
import os
import socket
import ssl
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.fault_backend import Fault, FaultBackend
from tests.support.gate import GateProcess

MESSAGES = int(os.environ.get("PORTCULLIS_MODEL_MESSAGES", "10000"))
BATCH = 100  # messages per Hypothesis example, sent by CLIENTS clients side by side
CLIENTS = 16
COMMAND_TIMEOUT, DATA_TIMEOUT = 0.5, 1.0  # the gate's backend timeouts, short to run fast

BACKEND_USERS = {"alice@example.test", "bob@example.test"}
GATE_VALID = ["alice@example.test", "bob@example.test", "carol@example.test"]  # carol: 550 at the backend
LOCAL_REFUSALS = {"nobody@example.test": 550, "x@elsewhere.test": 554}
RECIPIENTS = GATE_VALID + list(LOCAL_REFUSALS)

TRANSACTION_STEPS = ["mail", "rcpt:1", "rcpt:2", "rcpt:3", "rcpt:4", "data", "chunk:1",
                     "chunk:40", "chunk:2000", "end", "rset"]  # chunk:N: the N-th message line
FAULTS = [
    Fault.reply("421 4.3.2 Service shutting down"),
    Fault.reply("450 4.2.0 Mailbox busy"),
    Fault.reply("451 4.3.0 Local error"),
    Fault.reply("452 4.3.1 Insufficient system storage"),
    Fault.reply("550 5.7.1 Refused by policy"),
    Fault.reply("554 5.6.0 Message rejected"),
    Fault.reply("250 2.0.0 an answer to a question nobody asked"),
    Fault.reply("354 go ahead, out of turn"),
    Fault.hangup(),
    Fault.stall(),
    Fault.late(0.05),
    Fault.late(DATA_TIMEOUT + 0.5),
    Fault.malformed(),
    Fault.overlong(),
    Fault.lines(100),
]
# What a real server does mid-DATA: a last word (never a 2xx or 3xx), or silence.
FAULTS_MID_DATA = [f for f in FAULTS if f.kind != "reply" or f.text[0] in "45"]


def _fault_name(fault: Fault) -> str:
    return f"{fault.kind} {fault.text[:3]}".strip() if fault.kind == "reply" else fault.kind


@dataclass
class MessagePlan:
    recipients: list[str]
    body: Body
    pipelined: bool
    starttls: bool
    abandon: bool  # RSET instead of DATA
    faults: dict[str, Fault]
    connection_fault: tuple[str, Fault] | None  # banner or ehlo of a new backend connection


@dataclass
class Outcome:
    sender: str
    data: bytes
    rcpt: list[tuple[str, int]] = field(default_factory=list)
    data_code: int | None = None
    final: int | None = None
    closed_early: bool = False


@dataclass(frozen=True)
class Body:
    """Message content, drawn compactly: so many lines of one length, some starting
    with a dot (which the client must stuff and the backend must get stuffed)."""

    lines: int
    length: int
    dot_every: int

    def render(self) -> list[bytes]:
        return [(b"." if self.dot_every and i % self.dot_every == 0 else b"")
                + bytes([97 + i % 26]) * (self.length - 1) for i in range(self.lines)]


def _body() -> st.SearchStrategy[Body]:
    small = st.builds(Body, st.integers(0, 200), st.integers(1, 998), st.integers(0, 5))
    large = st.builds(Body, st.integers(1000, 4000), st.just(998), st.integers(0, 5))  # to 4 MB
    return st.integers(0, 99).flatmap(lambda p: large if p == 99 else small)


@st.composite
def message_plans(draw) -> MessagePlan:
    faulty = draw(st.integers(0, 9)) >= 4
    steps = draw(st.lists(st.sampled_from(TRANSACTION_STEPS), max_size=2, unique=True)) \
        if faulty else []
    return MessagePlan(
        recipients=draw(st.lists(st.sampled_from(RECIPIENTS), min_size=1, max_size=20)),
        body=draw(_body()),
        pipelined=draw(st.booleans()),
        starttls=draw(st.integers(0, 9)) == 9,
        abandon=draw(st.integers(0, 9)) == 9,
        faults={step: draw(st.sampled_from(FAULTS_MID_DATA if step.startswith("chunk")
                                           else FAULTS)) for step in steps},
        connection_fault=(draw(st.sampled_from(["banner", "ehlo"])), draw(st.sampled_from(FAULTS)))
        if draw(st.integers(0, 49)) == 49 else None,
    )


class _Client:
    """A plain SMTP client that reports every reply code, pipelining when asked."""

    def __init__(self, port: int):
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(
            ("127.0.0.1", port), timeout=30)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> int:
        while True:
            while b"\r\n" not in self.buffer:
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("the gate closed the connection")
                self.buffer += data
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            if line[3:4] != b"-":
                return int(line[:3])

    def command(self, line: str) -> int:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def start_tls(self) -> None:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        self.sock = context.wrap_socket(self.sock, server_hostname="mx.example.test")

    def close(self) -> None:
        self.sock.close()


def _stuffed(lines: list[bytes], number: int) -> bytes:
    head = [f"Message-ID: <{number}@model.test>".encode(), b"Subject: model", b""]
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                    for line in head + lines)


def run_message(port: int, plan: MessagePlan, number: int) -> Outcome:
    outcome = Outcome(f"m{number}@outside.test", _stuffed(plan.body.render(), number))
    client = _Client(port)
    try:
        assert client.reply() == 220
        assert client.command("EHLO client.test") == 250
        if plan.starttls:
            assert client.command("STARTTLS") == 220
            client.start_tls()
            assert client.command("EHLO client.test") == 250
        commands = [f"MAIL FROM:<{outcome.sender}>"] + [f"RCPT TO:<{r}>" for r in plan.recipients]
        if plan.pipelined:
            client.send("".join(c + "\r\n" for c in commands).encode())
            codes = [client.reply() for _ in commands]
        else:
            codes = [client.command(c) for c in commands]
        outcome.rcpt = list(zip(plan.recipients, codes[1:], strict=True))
        if codes[0] == 250 and not plan.abandon and any(c == 250 for c in codes[1:]):
            outcome.data_code = client.command("DATA")
            if outcome.data_code == 354:
                client.send(outcome.data + b".\r\n")
                outcome.final = client.reply()
        client.command("RSET")
        client.command("QUIT")
    except (ConnectionError, OSError):
        outcome.closed_early = True
    finally:
        client.close()
    return outcome


@dataclass
class Tally:
    messages: int = 0
    delivered: int = 0
    lost: list[str] = field(default_factory=list)
    transient_to_permanent: list[str] = field(default_factory=list)
    duplicates: int = 0
    unexplained_duplicates: list[str] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        self.messages += other.messages
        self.delivered += other.delivered
        self.duplicates += other.duplicates
        self.lost += other.lost
        self.transient_to_permanent += other.transient_to_permanent
        self.unexplained_duplicates += other.unexplained_duplicates


def check(outcome: Outcome, plan: MessagePlan, deliveries, tally: Tally) -> None:
    """Compare what the client was told with what the backend recorded."""
    tally.messages += 1
    told = sorted(r for r, code in outcome.rcpt if code == 250)
    mine = [d for d in deliveries if d.sender == outcome.sender]
    if outcome.final == 250:
        tally.delivered += 1
        if not any(d.data == outcome.data and sorted(d.recipients) == told for d in mine):
            copies = [(sorted(d.recipients), d.data == outcome.data) for d in mine]
            tally.lost.append(
                f"{outcome.sender} told 250 for {told}; the backend has (recipients, same "
                f"bytes): {copies}; rcpt {outcome.rcpt}, faults {plan.faults}, pipelined "
                f"{plan.pipelined}, tls {plan.starttls}, {len(outcome.data)} bytes")
    elif mine:
        tally.duplicates += 1
        if "end" not in plan.faults:  # only a garbled or late final answer can explain it
            tally.unexplained_duplicates.append(f"{outcome.sender}: {outcome} {plan.faults}")
    permanent = {step for step, fault in plan.faults.items() if not fault.is_transient}
    backend_rcpt = 0
    for recipient, code in outcome.rcpt:
        if recipient in LOCAL_REFUSALS:
            explained = code == LOCAL_REFUSALS[recipient]
        else:
            backend_rcpt += 1
            explained = (recipient not in BACKEND_USERS or "mail" in permanent
                         or f"rcpt:{backend_rcpt}" in permanent)
        if code >= 500 and not explained:
            tally.transient_to_permanent.append(f"{outcome.sender} RCPT {recipient}: {code} "
                                                f"with faults {plan.faults}")
    # A last word mid-DATA can cross the final dot and be read as the answer to it.
    end_explained = any(step == "end" or step.startswith("chunk") for step in permanent)
    for step, code, explained in (("DATA", outcome.data_code, "data" in permanent),
                                  ("end-of-data", outcome.final, end_explained)):
        if code is not None and code >= 500 and not explained:
            tally.transient_to_permanent.append(f"{outcome.sender} {step}: {code} "
                                                f"with faults {plan.faults}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    with FaultBackend(users=BACKEND_USERS) as backend:
        directory = tmp_path_factory.mktemp("model")
        with GateProcess(directory, f"127.0.0.1:{backend.port}", allowlist=["127.0.0.0/8"],
                         log_level="warning",
                         backend={"servers": [f"127.0.0.1:{backend.port}"], "connect_timeout": 1,
                                  "command_timeout": COMMAND_TIMEOUT,
                                  "data_timeout": DATA_TIMEOUT},
                         limits={"pregreet_delay": 0, "max_message_size": 8 * 1024 * 1024,
                                 "max_recipients": 20}) as gate:
            yield gate, backend, Tally()


def test_no_message_lost_and_no_transient_fault_made_permanent(setup):
    gate, backend, tally = setup
    numbers = iter(range(10**9))

    @settings(max_examples=max(1, MESSAGES // BATCH), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(message_plans(), min_size=min(BATCH, MESSAGES), max_size=min(BATCH, MESSAGES)))
    def batch(plans: list[MessagePlan]) -> None:
        numbered = [(next(numbers), plan) for plan in plans]
        for number, plan in numbered:
            for step, fault in plan.faults.items():
                backend.plan(step, fault, sender=f"m{number}@outside.test")

        def one(item: tuple[int, MessagePlan]) -> tuple[MessagePlan, Outcome]:
            number, plan = item
            if plan.connection_fault:
                backend.plan(*plan.connection_fault)
            outcome = run_message(gate.port, plan, number)
            backend.forget(outcome.sender)
            return plan, outcome

        with ThreadPoolExecutor(CLIENTS) as pool:
            results = list(pool.map(one, numbered))
        deliveries = backend.take_deliveries()
        this_batch = Tally()
        for plan, outcome in results:
            check(outcome, plan, deliveries, this_batch)
        tally.add(this_batch)
        problems = (this_batch.lost + this_batch.transient_to_permanent
                    + this_batch.unexplained_duplicates)
        assert not problems, "\n".join(problems[:3])

    for _ in range(10):  # Hypothesis may run fewer examples than asked; bounded
        batch()
        if tally.messages >= MESSAGES:
            break
    kinds = collections.Counter(_fault_name(fault) for _, _, fault in backend.fired)
    print(f"\nrelay model: {tally.messages} messages, {tally.delivered} delivered, "
          f"{sum(kinds.values())} faults fired ({dict(sorted(kinds.items()))}), "
          f"lost {len(tally.lost)}, transient->5xx {len(tally.transient_to_permanent)}, "
          f"duplicates {tally.duplicates}")
    assert tally.messages >= MESSAGES
    assert tally.delivered > 0 and sum(kinds.values()) > 0
