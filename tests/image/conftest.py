"""Testinfra checks of a booted Portcullis appliance.

Run against any appliance reachable over SSH as an admin with sudo:
    pytest tests/image --hosts=paramiko://admin@HOST:PORT --ssh-identity-file=KEY --sudo
(molecule's verify step does this against its VM). Expected values come from the
roles' defaults, so a changed default changes the check, not a copy of it.

The checks marked `host` hold on any host the roles were applied to by ansible/host.yml
(the gate, its firewall table, the DoS sysctls), not only on the image: `-m host`
(molecule scenario `host`). The rest check the image's hardening and stripping.
"""

from __future__ import annotations

import pathlib

import pytest
import yaml

ROLES = pathlib.Path(__file__).resolve().parents[2] / "ansible" / "roles"


def pytest_configure(config):
    config.addinivalue_line("markers", "lynis: runs a Lynis audit in the appliance (minutes under TCG)")
    config.addinivalue_line("markers", "host: holds on any host host.yml was applied to, not only the image")


def role_defaults(role: str) -> dict:
    return yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text())


@pytest.fixture(scope="session")
def harden() -> dict:
    return role_defaults("harden")


@pytest.fixture(scope="session")
def sysctl_dos() -> dict:
    return role_defaults("sysctl_dos")


@pytest.fixture(scope="session")
def nftables() -> dict:
    return role_defaults("nftables")


@pytest.fixture(scope="session")
def strip() -> dict:
    return role_defaults("strip")


@pytest.fixture(scope="session")
def portcullis() -> dict:
    return role_defaults("portcullis")


def unit_property(host, unit: str, name: str) -> str:
    return host.check_output(f"systemctl show -P {name} {unit}")


def main_pid(host, unit: str) -> int:
    return int(unit_property(host, unit, "MainPID"))
