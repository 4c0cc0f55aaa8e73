"""The gate with its recipients in a real slapd: lookups, outage, cache under a storm."""

import smtplib
import time
import urllib.request

import pytest

from tests.support.gate import GateProcess
from tests.support.slapd import GATE_DN, GATE_PASSWORD, SUFFIX, Person, Slapd
from tests.support.tools import free_port

PEOPLE = [Person("alice", "alice@example.test"), Person("bob", "bob@example.test"),
          Person("carol", "carol@example.test")]
STORM_SOURCE = "127.0.0.80"


@pytest.fixture
def ldap_gate(postfix_backend, tmp_path):
    server = Slapd(tmp_path / "slapd", PEOPLE)
    server.start()
    password = tmp_path / "bind-password"
    password.write_text(GATE_PASSWORD + "\n")
    metrics = f"127.0.0.1:{free_port()}"
    gate = GateProcess(tmp_path, f"127.0.0.1:{postfix_backend.port}", workers=1,
                       allowlist=[f"{STORM_SOURCE}/32"], metrics={"listen": metrics},
                       recipients={"source": "ldap", "ldap": {
                           "url": server.url, "bind_dn": GATE_DN,
                           "password_file": str(password), "base": SUFFIX, "timeout": 1,
                           "filter": "(mail={addr})"}})
    with gate:
        yield gate, server, metrics
    server.stop()


def rcpt_codes(gate, addresses, source="127.0.0.1") -> list[tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", gate.port, local_hostname="client.test",
                      source_address=(source, 0), timeout=30) as client:
        client.ehlo()
        client.mail("s@outside.test")
        return [client.rcpt(address) for address in addresses]


def counter(metrics: str, name: str) -> float:
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def test_directory_answers_then_outage_gives_451_then_recovers(ldap_gate):
    gate, server, _ = ldap_gate
    found, unknown, injection = rcpt_codes(
        gate, ["alice@example.test", "nobody@example.test", "*)(mail=*@example.test"])
    assert found[0] == 250
    assert unknown[:2] == (550, b"5.1.1 Recipient address rejected: user unknown")[:2]
    assert injection[0] in (501, 550)  # never a match for everyone
    server.kill()
    (outage,) = rcpt_codes(gate, ["bob@example.test"])
    assert outage[0] == 451 and outage[1].startswith(b"4.4.3")
    server.start()
    (back,) = rcpt_codes(gate, ["carol@example.test"])
    assert back[0] == 250


def test_probe_storm_is_served_from_the_cache(ldap_gate):
    gate, _, metrics = ldap_gate
    addresses = [f"user{i}@example.test" for i in range(27)] + [p.mail for p in PEOPLE]
    storm = [addresses[(i * 7) % len(addresses)] for i in range(300)]
    replies = []
    for start in range(0, len(storm), 100):  # 100 recipients per message, the RFC limit
        replies += rcpt_codes(gate, storm[start:start + 100], source=STORM_SOURCE)
    valid = {p.mail for p in PEOPLE}
    assert [code for code, _ in replies] == [250 if a in valid else 550 for a in storm]
    time.sleep(1.5)  # the worker reports its counters every second
    hits = counter(metrics, "portcullis_directory_cache_hits_total")
    misses = counter(metrics, "portcullis_directory_cache_misses_total")
    assert misses <= len(addresses) + 1  # each distinct address asked once
    rate = hits / (hits + misses)
    assert rate > 0.85
    print(f"\nLDAP cache under a probe storm: {int(hits)} hits, {int(misses)} misses, "
          f"hit rate {rate:.1%}")
