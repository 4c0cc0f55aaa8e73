"""The built qcow2, booted with a seed, in front of a real Postfix on the host.

The tests run in file order on one booted appliance: mail first, then the DHA burst
that bans the client address (10.0.2.2, the only one QEMU's user network gives), then
the reboot that must keep the configuration and the ban, checked from the box itself.
The ban and the generated TLS pair outlive the reboot on the data disk the fixture
attaches (test_state.py: across a power-off, the boot medium and an upgrade).
"""

from __future__ import annotations

import os
import smtplib
import subprocess
import sys

import pytest

from tests.e2e.appliance import BUILD_KEY, TOP, read_banner
from tests.e2e.conftest import BOOT_TIMEOUT, DOMAIN, GATE_HOSTNAME
from tests.support.postfix import as_sent

MESSAGE = (b"From: Sender <sender@outside.example>\r\n"
           b"To: Alice <alice@example.test>\r\n"
           b"Subject: through the appliance\r\n"
           b"Message-ID: <e2e-1@outside.example>\r\n"
           b"\r\n"
           b"Line one.\r\n"
           b".leading dot, stuffed on the wire\r\n"
           b"8bit: \xc3\xa9t\xc3\xa9\r\n")


def smtp(port: int) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, local_hostname="client.outside.example", timeout=120)
    client.ehlo()
    return client


def rcpt_code(client: smtplib.SMTP, address: str) -> int:
    return client.rcpt(address)[0]


def test_banner_names_the_seeded_hostname(appliance):
    assert read_banner(appliance.smtp_port).startswith(f"220 {GATE_HOSTNAME}".encode())


def test_valid_message_is_delivered_byte_exact(appliance, backend):
    before = len(backend.messages("alice"))
    with smtp(appliance.smtp_port) as client:
        client.sendmail("sender@outside.example", [f"alice@{DOMAIN}"], MESSAGE)
    delivered = backend.wait_for("alice", before + 1, timeout=60)[-1]
    assert as_sent(delivered) == MESSAGE


def test_swaks_delivers_through_the_appliance(appliance, backend):
    before = len(backend.messages("bob"))
    result = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{appliance.smtp_port}", "--from", "s@outside.example",
         "--to", f"bob@{DOMAIN}", "--helo", "client.outside.example", "--body", "via swaks",
         "--timeout", "120"], capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert b"via swaks" in backend.wait_for("bob", before + 1, timeout=60)[-1]


def test_unknown_recipient_and_foreign_domain_refused_at_rcpt(appliance, backend):
    with smtp(appliance.smtp_port) as client:
        client.mail("sender@outside.example")
        assert rcpt_code(client, f"nobody@{DOMAIN}") == 550
        assert rcpt_code(client, "victim@elsewhere.example") in (550, 554)  # not an open relay
        client.rset()
    backend.assert_no_bounce()


def test_config_and_ban_survive_a_reboot(appliance, boot_figures):
    """(Harvests, floods and idle connections from many addresses: test_lab.py.)"""
    # The host's address is every client here: banned by the operator's CLI, as an admin would.
    appliance.ssh("sudo /opt/portcullis/bin/portcullis bans add 10.0.2.2 3600")
    assert not read_banner(appliance.smtp_port, timeout=10).startswith(b"220")
    seeded = appliance.ssh("sudo cat /etc/portcullis/portcullis.yaml")
    certificate = appliance.tls_fingerprint()  # the pair the gate made, on the data disk
    boot_figures["reboot until the gate answers"] = appliance.reboot(BOOT_TIMEOUT)
    assert appliance.local_banner().startswith(f"220 {GATE_HOSTNAME}")
    assert appliance.ssh("sudo cat /etc/portcullis/portcullis.yaml") == seeded
    assert "10.0.2.2" in appliance.ssh("sudo nft list set inet portcullis portcullis_ban4"), \
        "the ban did not survive the reboot"
    assert appliance.ssh("findmnt -n -o FSTYPE /var/lib/portcullis").strip() == "ext4"
    assert appliance.tls_fingerprint() == certificate
    assert not read_banner(appliance.smtp_port, timeout=10).startswith(b"220")


@pytest.mark.parametrize("unit", ["portcullis-seed.service", "portcullis.service"])
def test_units_active_after_boot(appliance, unit):
    # As root: systemctl reaches systemd without D-Bus (the appliance has none).
    assert appliance.ssh(f"sudo systemctl is-active {unit}", check=False).strip() == "active"


def test_testinfra_hardening_suite_passes(appliance):
    """The roles' testinfra suite (tests/image) against this appliance. The Lynis audit
    takes 15 minutes or more under TCG: it runs only with PORTCULLIS_LYNIS=1.
    Last in the file: nothing after it depends on it."""
    report = appliance.workdir / "testinfra.log"
    lynis = os.environ.get("PORTCULLIS_LYNIS") == "1"
    with open(report, "w") as output:
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rA", "-s", "-p", "no:cacheprovider",
             *([] if lynis else ["-m", "not lynis"]),
             str(TOP / "tests" / "image"), f"--hosts=paramiko://admin@127.0.0.1:{appliance.ssh_port}",
             f"--ssh-identity-file={BUILD_KEY}", "--sudo"],
            cwd=TOP, stdout=output, stderr=subprocess.STDOUT, timeout=2400 if lynis else 900,
            check=False)
    print(report.read_text()[-8000:])
    assert result.returncode == 0, report.read_text()[-8000:]
