"""Who greylisting leaves alone, judged by real DNS answers: clients a DNS allowlist
vouches for, and large senders by their forward-confirmed name. In network namespaces
with global addresses (11.0.0.0/8), because the gate asks DNS only about Internet
clients (tests/support/lab.py)."""

import pytest

from tests.support import netns
from tests.support.dns_server import Records
from tests.support.lab import appliance_lab

pytestmark = [pytest.mark.netns, netns.requires_root]

LARGE, VOUCHED, UNKNOWN = "11.0.1.2", "11.0.2.3", "11.0.3.4"
RECORDS = Records(
    addresses={"mta7.bulk.large.test": [LARGE],
               "3.2.0.11.wl.test": ["127.0.0.2"]},  # the allowlist names 11.0.2.3
    pointers={LARGE: ["mta7.bulk.large.test"]},
)
SEND = """
import json, smtplib
with smtplib.SMTP({gate!r}, 25, local_hostname="mta.sender.test",
                  source_address=({source!r}, 0), timeout=30) as client:
    client.ehlo()
    client.mail("news@sender.test")
    print(json.dumps(client.rcpt("alice@example.test")[0]))
"""


def test_large_senders_and_vouched_clients_are_not_greylisted(tmp_path):
    with appliance_lab(tmp_path, "11.0.0.1/8", (f"{LARGE}/8", f"{VOUCHED}/8", f"{UNKNOWN}/8"),
                       dns_records=RECORDS,
                       greylist={"enabled": True, "exempt_names": ["large.test"]},
                       dns={"dnsbl": {"sites": ["wl.test=127.0.0.2*-5"], "timeout": 2},
                            "fcrdns": {"timeout": 2}}) as lab:
        codes = {source: lab.run_client(SEND.format(gate=lab.gate, source=source))
                 for source in (LARGE, VOUCHED, UNKNOWN)}
    assert codes == {LARGE: 250, VOUCHED: 250, UNKNOWN: 451}
