"""The stripped system: no build tools, no other MTA, minimal setuid, inventory kept."""

import pytest
from conftest import role_defaults

STRIP = role_defaults("strip")


@pytest.mark.parametrize("package", STRIP["strip_build_packages"] + STRIP["strip_mail_packages"])
def test_package_absent(host, package):
    assert not host.package(package).is_installed


@pytest.mark.parametrize("tool", ["gcc", "cc", "c++", "make", "as", "ld", "sendmail", "exim4"])
def test_no_build_tool_or_mta(host, tool):
    assert not host.exists(tool)


def test_setuid_files_only_the_allowed(host, strip):
    found = set(host.check_output("find / -xdev -type f -perm /6000").split())
    assert found <= set(strip["strip_setuid_allowed"])


def test_inventory_recorded(host, strip):
    inventory = host.file(strip["strip_inventory_path"])
    assert inventory.exists
    text = inventory.content_string
    assert "/usr/bin/sudo" in text
    installed = host.check_output("dpkg-query -W -f='${binary:Package}\\n'").split()
    assert f"[packages ({len(installed)})]" in text


def test_no_documentation(host):
    leftovers = host.check_output(
        "find /usr/share/doc /usr/share/man -type f ! -name copyright | head -5")
    assert leftovers == ""
