"""Booting: fail closed without a valid seed, the live ISO, and UEFI firmware."""

from __future__ import annotations

import pytest

from tests.e2e.appliance import Appliance, built, read_banner, require_tools
from tests.e2e.conftest import BOOT_TIMEOUT, GATE_HOSTNAME, gate_config, make_seed

# The seed unit's verdict is on the console once the system is up (login prompt).
SEED_FAILED = "portcullis-seed: FAILED:"
LOGIN_PROMPT = "login:"


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
    with Appliance(tmp_path, iso=built("iso"), seed=seed,
                   backend=f"{backend.host}:{backend.port}") as box:
        boot_figures["ISO boot to banner"] = box.wait_for_banner(BOOT_TIMEOUT)
        assert read_banner(box.smtp_port).startswith(f"220 {GATE_HOSTNAME}".encode())


@pytest.mark.parametrize("kind", ["qcow2", "iso"])
def test_uefi_firmware_starts_the_kernel(tmp_path, kind):
    image = built(kind)
    with Appliance(tmp_path, uefi=True, **{"disk" if kind == "qcow2" else "iso": image}) as box:
        box.wait_for_console("Linux version", 180)
