"""The gate's state directory: the data disk (label PORTCULLIS-DATA) or, without one, a
tmpfs that the journal warns about; mounted before the seed and the gate start.

Holds with and without a data disk (molecule boots none; the end-to-end tests both)."""

import pytest
from conftest import role_defaults, unit_property

DATA_DISK = role_defaults("data_disk")
STATE_DIR = DATA_DISK["data_disk_mount_point"]
UNIT = "portcullis-data.service"


@pytest.fixture(scope="module")
def status(host) -> dict:
    text = host.file(DATA_DISK["data_disk_status_dir"] + "/status").content_string
    return dict(line.split("=", 1) for line in text.splitlines())


def test_unit_enabled_and_ran(host):
    assert host.service(UNIT).is_enabled
    assert unit_property(host, UNIT, "ActiveState") == "active"
    assert unit_property(host, UNIT, "Result") == "success"


def test_state_directory_is_a_mount_of_its_own(host, status):
    mount = host.mount_point(STATE_DIR)
    assert mount.exists
    assert mount.filesystem == ("ext4" if status["storage"] == "disk" else "tmpfs")
    assert set(DATA_DISK["data_disk_mount_options"].split(",")) <= set(mount.options)


def test_state_directory_belongs_to_the_gate(host, portcullis):
    directory = host.file(STATE_DIR)
    user = portcullis["portcullis_user"]
    assert (directory.user, directory.group, directory.mode) == (user, user, 0o750)


def test_status_file_and_journal_say_where_the_state_is(host, status):
    journal = host.check_output(f"journalctl -b -o cat -u {UNIT}")
    if status["storage"] == "disk":
        assert host.mount_point(STATE_DIR).device == status["device"]
        assert f"state on the data disk {status['device']}" in journal
    else:
        assert status["storage"] == "tmpfs"
        assert "state (bans, reputation, TLS pair) is lost at reboot" in status["message"]
        assert status["message"] in journal
        warnings = host.check_output(f"journalctl -b -o cat -p warning -u {UNIT}")
        assert "is lost at reboot" in warnings


def test_status_command_says_where_the_state_is(host, status, portcullis):
    report = host.check_output(f"{portcullis['portcullis_venv']}/bin/portcullis status")
    states = [line for line in report.splitlines() if line.startswith("state: ")]
    if status["storage"] == "disk":
        assert states == [f"state: {STATE_DIR} on {status['device']} (ext4)"]
    else:
        lost = "bans, reputation and the TLS pair are lost at reboot"
        assert states == [f"state: {STATE_DIR} on tmpfs: {lost}"]


def test_gate_starts_only_after_the_mount(host):
    assert UNIT in unit_property(host, "portcullis.service", "Requires").split()
    assert UNIT in unit_property(host, "portcullis.service", "After").split()
    before = unit_property(host, UNIT, "Before").split()
    for unit in DATA_DISK["data_disk_before"]:
        if unit_property(host, unit, "LoadState") == "loaded":  # no seed unit in molecule
            assert unit in before
