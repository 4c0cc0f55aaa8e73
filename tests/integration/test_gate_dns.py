"""DNS and HELO checks at the gate, against a real DNS server, in network namespaces.

The addresses are global ones (11.0.0.0/8) inside isolated namespaces, because the
gate runs DNS checks only for Internet clients.
"""

import pytest

from tests.support import netns
from tests.support.dns_server import Records
from tests.support.lab import appliance_lab

pytestmark = [pytest.mark.netns, netns.requires_root]

GOOD, LISTED, NAMELESS = "11.0.0.2", "11.0.0.3", "11.0.0.4"
RECORDS = Records(
    addresses={"mail.good.test": [GOOD], "3.0.0.11.bl.test": ["127.0.0.2"]},
    pointers={GOOD: ["mail.good.test"]},
)

SEND = """
import json, smtplib
replies = []
with smtplib.SMTP({gate!r}, 25, local_hostname={helo!r}, source_address=({source!r}, 0),
                  timeout=30) as client:
    replies.append(client.ehlo()[0])
    if replies[-1] == 250:
        replies.append(client.mail("s@outside.test")[0])
        code, text = client.rcpt("alice@example.test")
        replies.append(code)
        if code == 250:
            replies.append(client.data(b"Subject: dns\\r\\n\\r\\nchecked\\r\\n")[0])
print(json.dumps({{"replies": replies}}))
"""


@pytest.fixture(scope="module")
def dns_lab(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dns-lab")
    with appliance_lab(workdir, "11.0.0.1/8", (f"{GOOD}/8", f"{LISTED}/8", f"{NAMELESS}/8"),
                       dns_records=RECORDS,
                       dns={"dnsbl": {"sites": ["bl.test=127.0.0.[2..11]"], "action": "reject",
                                      "timeout": 2},
                            "fcrdns": {"timeout": 2}}) as lab:
        yield lab


def send(lab, source: str, helo: str = "mail.good.test") -> list[int]:
    return lab.run_client(SEND.format(gate=lab.gate, source=source, helo=helo))["replies"]


def line_of(lab, source: str) -> dict:
    return [line for line in lab.session_lines() if line["client"] == source][-1]


def test_client_with_confirmed_reverse_dns_delivers(dns_lab):
    assert send(dns_lab, GOOD) == [250, 250, 250, 250]
    message = dns_lab.backend.wait_for("alice")[-1]
    # The verified name is in the gate's trace header (and goes to the backend as NAME).
    assert b"from mail.good.test (mail.good.test [11.0.0.2])" in message
    assert "FCRDNS_FAIL" not in line_of(dns_lab, GOOD)["labels"]


def test_dnsbl_listed_client_refused_at_rcpt(dns_lab):
    assert send(dns_lab, LISTED) == [250, 250, 554]
    line = line_of(dns_lab, LISTED)
    assert "DNSBL" in line["labels"] and line["mail"][0]["rcpts"][0]["reply"] == 554


def test_missing_reverse_dns_only_scores(dns_lab):
    assert send(dns_lab, NAMELESS) == [250, 250, 250, 250]
    line = line_of(dns_lab, NAMELESS)
    assert "FCRDNS_FAIL" in line["labels"] and "no_reverse_dns" in line["score"]


def test_helo_claiming_to_be_us_is_rejected(dns_lab):
    assert send(dns_lab, GOOD, helo="mx.example.test")[0] == 550
    assert "HELO_OURS" in line_of(dns_lab, GOOD)["labels"]
