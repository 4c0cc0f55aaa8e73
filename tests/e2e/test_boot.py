"""Booting: fail closed without a valid seed, the live ISO (without a data disk), and
UEFI firmware."""

from __future__ import annotations

import smtplib

import pytest

from tests.e2e.appliance import Appliance, built, read_banner, require_tools
from tests.e2e.conftest import BOOT_TIMEOUT, DOMAIN, GATE_HOSTNAME, gate_config, make_seed

# The seed unit's verdict is on the console once the system is up (login prompt).
SEED_FAILED = "portcullis-seed: FAILED:"
LOGIN_PROMPT = "login:"
NO_DATA_DISK = ("no data disk labelled PORTCULLIS-DATA: "
                "state (bans, reputation, TLS pair) is lost at reboot")


@pytest.fixture(autouse=True)
def tools():
    require_tools()


def boot_and_read_verdict(tmp_path, seed) -> Appliance:
    box = Appliance(tmp_path, disk=built("qcow2"), seed=seed)
    box.start()
    box.wait_for_console(LOGIN_PROMPT, BOOT_TIMEOUT)
    return box


def test_without_a_seed_the_gate_stays_closed_and_says_why(tmp_path):
    box = boot_and_read_verdict(tmp_path, seed=None)
    try:
        box.wait_for_console(SEED_FAILED, 60)
        assert "no seed disk labelled PORTCULLIS-SEED is attached" in box.console()
        assert read_banner(box.smtp_port, timeout=10) == b""
    finally:
        box.stop()


def test_an_invalid_seed_keeps_the_gate_closed_and_names_the_key(tmp_path):
    # Valid YAML that the gate's own schema refuses (no relay domain).
    bad = gate_config().replace("relay_domains: [example.test]", "relay_domains: []")
    box = boot_and_read_verdict(tmp_path, seed=make_seed(tmp_path / "seed", bad, checked=False))
    try:
        box.wait_for_console(SEED_FAILED, 60)
        assert "relay_domains" in box.console()
        assert read_banner(box.smtp_port, timeout=10) == b""
    finally:
        box.stop()


def test_live_iso_boots_to_the_banner(tmp_path, backend, seed, boot_figures):
    """Without a data disk, too: it serves mail, its state is on a tmpfs, and the console
    and the journal say that this state is lost at reboot."""
    with Appliance(tmp_path, iso=built("iso"), seed=seed,
                   backend=f"{backend.host}:{backend.port}") as box:
        boot_figures["ISO boot to banner"] = box.wait_for_banner(BOOT_TIMEOUT)
        assert read_banner(box.smtp_port).startswith(f"220 {GATE_HOSTNAME}".encode())
        before = len(backend.messages("alice"))
        with smtplib.SMTP("127.0.0.1", box.smtp_port, local_hostname="client.outside.example",
                          timeout=120) as client:
            client.sendmail("sender@outside.example", [f"alice@{DOMAIN}"],
                            b"Subject: no data disk\r\n\r\nState on tmpfs.\r\n")
        assert b"State on tmpfs." in backend.wait_for("alice", before + 1, timeout=60)[-1]
        assert NO_DATA_DISK in box.console()
        box.wait_for_ssh(BOOT_TIMEOUT)
        assert box.ssh("findmnt -n -o FSTYPE /var/lib/portcullis").strip() == "tmpfs"
        assert NO_DATA_DISK in box.ssh("sudo journalctl -b -o cat -p warning -u portcullis-data")
        assert box.ssh("cat /run/portcullis-data/status").startswith("storage=tmpfs\n")


@pytest.mark.parametrize("kind", ["qcow2", "iso"])
def test_uefi_firmware_starts_the_kernel(tmp_path, kind):
    image = built(kind)
    with Appliance(tmp_path, uefi=True, **{"disk" if kind == "qcow2" else "iso": image}) as box:
        box.wait_for_console("Linux version", 180)
