"""Recipient addresses reach the backend in one normal form, and never with routing in them.

A backend that trusts the gate may apply the percent hack, bang paths, dequoting or a
source route, and relay such an address onward: the gate refuses them (550 5.1.3).
"""

import smtplib

import pytest

from tests.support.fault_backend import FaultBackend
from tests.support.gate import GateProcess


@pytest.fixture(scope="module")
def backend():
    with FaultBackend() as running:
        yield running


def gate_with(tmp_path, backend, recipients: str) -> GateProcess:
    gate = GateProcess(tmp_path, f"127.0.0.1:{backend.port}", allowlist=["127.0.0.0/8"])
    gate.recipients.write_text(recipients)
    return gate


@pytest.mark.parametrize("address", [
    "user%evil.example@example.test",
    '"user@evil.example"@example.test',
    "evil.example!user@example.test",
    "@relay.example:user@example.test",
])
def test_routing_in_a_recipient_is_refused_even_for_a_whole_domain(tmp_path, backend, address):
    with gate_with(tmp_path, backend, "@example.test\n") as gate, \
            smtplib.SMTP("127.0.0.1", gate.port, local_hostname="client.test") as client:
        client.ehlo()
        client.mail("s@outside.test")
        code, text = client.docmd("RCPT", f"TO:<{address}>")  # verbatim, unlike rcpt()
    assert (code, text[:5]) == (550, b"5.1.3")
    assert "ADDRESS_ROUTING" in gate.log_text()


def test_a_trailing_dot_and_quotes_reach_the_directory_and_backend_normalised(tmp_path, backend):
    backend.take_deliveries()
    with gate_with(tmp_path, backend, "alice@example.test\n") as gate, \
            smtplib.SMTP("127.0.0.1", gate.port, local_hostname="client.test") as client:
        client.ehlo()
        client.mail("s@outside.test")
        assert client.rcpt("alice@Example.TEST.")[0] == 250
        assert client.rcpt('"alice"@example.test')[0] == 250
        assert client.data(b"Subject: normal form\r\n\r\nbody\r\n")[0] == 250
    assert [d.recipients for d in backend.take_deliveries()] == [
        ["alice@example.test", "alice@example.test"]]
