"""File permissions, mounts, logging, time, updates and AppArmor."""

import pytest
from conftest import role_defaults

HARDEN = role_defaults("harden")


@pytest.mark.parametrize("entry", HARDEN["harden_file_permissions"], ids=lambda e: e["path"])
def test_sensitive_file_permissions(host, entry):
    f = host.file(entry["path"])
    assert (f.user, f.group, f.mode) == (entry["owner"], entry["group"], int(entry["mode"], 8))


@pytest.mark.host
def test_gate_configuration_readable_by_its_group_only(host, portcullis):
    directory = host.file(portcullis["portcullis_config_dir"])
    assert (directory.user, directory.group, directory.mode) == ("root", "portcullis", 0o750)
    config = host.file(portcullis["portcullis_config_dir"] + "/portcullis.yaml")
    assert (config.user, config.group, config.mode) == ("root", "portcullis", 0o640)


@pytest.mark.parametrize("mount", HARDEN["harden_tmp_mounts"], ids=lambda m: m["path"])
def test_scratch_mounts(host, mount):
    options = host.mount_point(mount["path"]).options
    assert {"nodev", "nosuid", "noexec"} <= set(options)


def test_umask(host, harden):
    assert host.file("/etc/login.defs").contains(f"^UMASK[[:space:]]*{harden['harden_umask']}$")


def test_pam_faillock_and_pwquality(host):
    assert host.file("/etc/pam.d/common-auth").contains("pam_faillock.so preauth")
    assert host.file("/etc/pam.d/common-auth").contains("pam_faillock.so authfail")
    assert host.file("/etc/pam.d/common-password").contains("pam_pwquality.so")


def test_module_blacklist(host, harden):
    for module in harden["harden_modules_blacklist"]:
        # modprobe -n -v lists what loading would do: dependencies, then the module.
        steps = host.run(f"modprobe -n -v {module}").stdout.strip().splitlines()
        assert steps[-1].strip() == "install /bin/true", module


def test_journal_persistent(host):
    assert host.file("/var/log/journal").is_directory
    assert host.run("journalctl --header -q | grep -q '/var/log/journal'").rc == 0


def test_time_sync_enabled(host):
    assert host.service("systemd-timesyncd").is_enabled


def test_unattended_security_upgrades(host):
    config = host.check_output("apt-config dump Unattended-Upgrade::Origins-Pattern")
    assert "Debian-Security" in config
    assert "label=Debian\"" not in config
    assert host.file("/etc/apt/apt.conf.d/20auto-upgrades").contains("Unattended-Upgrade \"1\"")


def test_apparmor_enabled(host):
    assert host.file("/sys/module/apparmor/parameters/enabled").content_string.strip() == "Y"
    assert host.service("apparmor").is_enabled
