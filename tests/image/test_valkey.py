"""The fleet's shared store (role valkey) is off in the default image: not installed, its
port neither listening nor opened in the firewall. (With valkey_enabled these checks are
skipped: the store's rendered configuration is tested in tests/integration.)"""

import pathlib

import pytest
import yaml
from conftest import role_defaults

VALKEY = role_defaults("valkey")
SITE = yaml.safe_load(
    (pathlib.Path(__file__).resolve().parents[2] / "ansible" / "group_vars" / "all" / "appliance.yml").read_text())
PORT = SITE["appliance_fleet_store_port"]

pytestmark = pytest.mark.skipif(VALKEY["valkey_enabled"], reason="the store is enabled by default")


@pytest.mark.parametrize("package", VALKEY["valkey_packages"])
def test_store_not_installed(host, package):
    assert not host.package(package).is_installed


def test_store_port_closed(host):
    assert not host.socket(f"tcp://{PORT}").is_listening
    table = host.check_output(f"nft list table inet {SITE['appliance_ban_table']}")
    assert f"dport {PORT} " not in table
