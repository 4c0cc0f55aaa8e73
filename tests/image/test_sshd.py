"""sshd's effective configuration (sshd -T), as the harden role sets it."""

import pytest


@pytest.fixture(scope="module")
def effective(host) -> dict[str, str]:
    config = {}
    for line in host.check_output("sshd -T").splitlines():
        key, _, value = line.partition(" ")
        config.setdefault(key, value)
    return config


def test_key_only_and_no_root(effective):
    assert effective["permitrootlogin"] == "no"
    assert effective["passwordauthentication"] == "no"
    assert effective["kbdinteractiveauthentication"] == "no"
    assert effective["pubkeyauthentication"] == "yes"
    assert effective["permitemptypasswords"] == "no"


def test_modern_algorithms(effective, harden):
    assert effective["ciphers"] == ",".join(harden["harden_ssh_ciphers"])
    assert effective["kexalgorithms"] == ",".join(harden["harden_ssh_kex"])
    assert effective["macs"] == ",".join(harden["harden_ssh_macs"])


def test_limits_and_keepalive(effective, harden):
    assert int(effective["maxauthtries"]) == harden["harden_ssh_max_auth_tries"]
    assert int(effective["logingracetime"]) == harden["harden_ssh_login_grace_time"]
    assert int(effective["clientaliveinterval"]) == harden["harden_ssh_client_alive_interval"]
    assert int(effective["clientalivecountmax"]) == harden["harden_ssh_client_alive_count"]


def test_admin_group_and_banner(effective, harden):
    assert effective["allowgroups"] == harden["harden_admin_group"]
    assert effective["banner"] == "/etc/issue.net"


def test_no_forwarding(effective):
    for key in ("allowtcpforwarding", "allowagentforwarding", "x11forwarding", "permittunnel"):
        assert effective[key] == "no", key


def test_sshd_retries_until_the_management_address_is_up(host):
    """A bind to an address not up yet makes sshd exit 255, which Debian's unit would
    never restart: the admin would be locked out until someone reboots the box."""
    unit = dict(line.split("=", 1) for line in host.check_output(
        "systemctl show ssh.service -p Restart -p RestartPreventExitStatus "
        "-p StartLimitIntervalUSec").splitlines())
    assert unit["Restart"] == "on-failure"
    assert unit["RestartPreventExitStatus"] == ""
    assert unit["StartLimitIntervalUSec"] in ("0", "infinity")
