"""auditd runs with the rules for admin access, identity files and privileged commands."""

import pytest
from conftest import role_defaults

HARDEN = role_defaults("harden")


@pytest.fixture(scope="module")
def rules(host) -> str:
    return host.check_output("auditctl -l")


def test_auditd_running(host):
    assert host.service("auditd").is_running
    assert host.service("auditd").is_enabled


@pytest.mark.parametrize("watch", HARDEN["harden_audit_watches"], ids=lambda w: w["path"])
def test_watch_loaded(rules, watch):
    assert f"-w {watch['path']} -p wa -k {watch['key']}" in rules


@pytest.mark.parametrize("command", HARDEN["harden_audit_privileged_commands"])
def test_privileged_command_logged(rules, command):
    assert f"-F path={command} -F perm=x" in rules


def test_admin_commands_logged(rules):
    assert "-S execve -F euid=0" in rules
