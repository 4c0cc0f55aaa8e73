"""The boot-time state directory mounter (ansible/roles/data_disk/files/portcullis-data),
run for real.

As root, on disks made of image files attached to loop devices: an ext4 filesystem as
`make data-disk` makes it, a blank GPT partition named for the gate, and what must be
left alone. The settings are rendered from the role's template with every path in a
temporary directory, and each test's label is its own, so the script never finds a disk
of the host. `nobody`/`nogroup` play the gate's user. Each run is in a mount namespace of
its own (unshare), where the mount is looked at and which takes it away on exit.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import textwrap
from pathlib import Path

import jinja2
import pytest
import yaml

from tests.support.tools import require_tool

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loop devices and mounts need root")

TOP = Path(__file__).resolve().parents[2]
ROLE = TOP / "ansible/roles/data_disk"
SCRIPT = ROLE / "files/portcullis-data"
NOBODY = 65534  # nobody and nogroup on Debian
LOST = "state (bans, reputation, TLS pair) is lost at reboot"
# Run in the namespace after the script: what it left mounted, for the test to read.
PROBE = textwrap.dedent("""\
    "$@"; status=$?
    echo "== probe"
    echo "status=$status"
    echo "mount=$(findmnt -n -o FSTYPE,OPTIONS "$MNT" || echo none)"
    echo "owner=$(stat -c '%u:%g %a' "$MNT")"
    echo "entries=$(ls -A "$MNT" | tr '\\n' ' ')"
    ls -lnA "$MNT"
    """)


class Disks:
    """Image files on loop devices, a label of the test's own, and the script's settings."""

    def __init__(self, root: Path):
        self.root = root
        self.label = f"PCD-{secrets.token_hex(4).upper()}"
        self.mount_point = root / "state"
        self.status_dir = root / "run"
        self.devices: list[str] = []

    def file(self, name: str, size: str = "32M") -> Path:
        path = self.root / name
        subprocess.run(["truncate", "-s", size, str(path)], check=True)
        return path

    def attach(self, path: Path, partitions: bool = False) -> str:
        device = subprocess.run(["losetup", "--find", "--show", *(["-P"] if partitions else []),
                                 str(path)], check=True, capture_output=True, text=True).stdout.strip()
        self.devices.append(device)
        if partitions and not Path(f"{device}p1").exists():
            # The host's kernel may not scan loop devices' partition tables itself.
            subprocess.run(["partx", "-a", device], check=True, capture_output=True)
        return device

    def ext4(self, name: str, label: str | None = None, fstype: str = "ext4") -> str:
        """A whole-disk filesystem (label: the test's), attached."""
        path = self.file(name)
        subprocess.run([f"mkfs.{fstype}", "-q", "-F", "-L", label or self.label, str(path)],
                       check=True, capture_output=True)
        return self.attach(path)

    def partition(self, name: str, content: str | None = None) -> str:
        """A GPT disk whose one partition is named with the label, blank or holding
        `content` (a mkfs type); its partition device."""
        path = self.file(name)
        subprocess.run(["sgdisk", "--clear", "-n", "1:0:0", "-c", f"1:{self.label}", str(path)],
                       check=True, capture_output=True)
        partition = self.attach(path, partitions=True) + "p1"
        if content:
            subprocess.run([f"mkfs.{content}", "-q", "-F", partition], check=True, capture_output=True)
        return partition

    def settings(self, **overrides) -> Path:
        defaults = yaml.safe_load((ROLE / "defaults/main.yml").read_text())
        values = {key: value for key, value in defaults.items() if isinstance(value, str | int | bool)}
        values.update({
            "ansible_managed": "test_data_script", "data_disk_label": self.label,
            "data_disk_mount_point": str(self.mount_point), "data_disk_owner": "nobody",
            "data_disk_group": "nogroup", "data_disk_wait_seconds": 1,
            "data_disk_status_dir": str(self.status_dir), **overrides})
        template = jinja2.Template((ROLE / "templates/portcullis-data.default.j2").read_text(),
                                   undefined=jinja2.StrictUndefined)
        path = self.root / "portcullis-data.default"
        path.write_text(template.render(values))
        return path

    def run(self, **settings) -> Run:
        self.mount_point.mkdir(exist_ok=True)
        env = {**os.environ, "PORTCULLIS_DATA_DEFAULTS": str(self.settings(**settings)),
               "MNT": str(self.mount_point)}
        result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", PROBE,
                                 "sh", "/bin/sh", str(SCRIPT)], env=env, capture_output=True,
                                text=True, timeout=120, check=False)
        return Run(result.stdout + result.stderr, self.status_dir / "status")

    def close(self) -> None:
        for device in reversed(self.devices):
            subprocess.run(["partx", "-d", device], check=False, capture_output=True)
            subprocess.run(["losetup", "--detach", device], check=False, capture_output=True)


class Run:
    def __init__(self, output: str, status_file: Path):
        self.output = output
        said, _, probe = output.partition("== probe\n")
        self.said = said
        self.facts = dict(line.split("=", 1) for line in probe.splitlines() if "=" in line[:8])
        self.status = dict(line.split("=", 1) for line in status_file.read_text().splitlines()) \
            if status_file.exists() else {}

    @property
    def fstype(self) -> str:
        return self.facts["mount"].split()[0]

    @property
    def options(self) -> set[str]:
        return set(self.facts["mount"].split()[-1].split(","))


@pytest.fixture
def disks(tmp_path):
    for tool, package in (("losetup", "mount"), ("unshare", "util-linux"), ("sgdisk", "gdisk"),
                          ("partx", "util-linux"), ("mkfs.ext4", "e2fsprogs"), ("blkid", "util-linux")):
        require_tool(tool, package)
    box = Disks(tmp_path)
    yield box
    box.close()


def test_the_labelled_ext4_disk_is_mounted_and_handed_to_the_gate(disks):
    device = disks.ext4("data.img")
    run = disks.run()
    assert run.facts["status"] == "0", run.output
    assert run.fstype == "ext4", run.output
    assert {"nosuid", "nodev", "noexec"} <= run.options
    assert run.facts["owner"] == f"{NOBODY}:{NOBODY} 750"
    assert f"first use of {device}: the state directory is made nobody's, mode 0750" in run.said
    assert f"state on the data disk {device}" in run.said
    assert run.status == {"storage": "disk", "device": device,
                          "message": f"state on the data disk {device}"}


def test_files_of_other_ids_are_handed_over_but_lost_and_found_stays_roots(disks):
    """As after an upgrade to an image that numbers the gate's user differently."""
    device = disks.ext4("data.img")
    scratch = disks.root / "scratch"
    scratch.mkdir()
    subprocess.run(["mount", device, str(scratch)], check=True)
    try:
        (scratch / "tls").mkdir()
        (scratch / "tls" / "selfsigned.key").write_text("key")
        (scratch / "reputation.db").write_text("db")
        for path in (scratch, scratch / "tls", scratch / "tls" / "selfsigned.key",
                     scratch / "reputation.db"):
            os.chown(path, 4242, 4242)
    finally:
        subprocess.run(["umount", str(scratch)], check=True)
    run = disks.run()
    assert run.fstype == "ext4", run.output
    assert "its files belong to 4242:4242" in run.said
    listing = {line.split()[-1]: line.split()[2:4] for line in run.output.splitlines()
               if line.startswith(("d", "-"))}
    assert listing["reputation.db"] == [str(NOBODY), str(NOBODY)]
    assert listing["tls"] == [str(NOBODY), str(NOBODY)]
    assert listing["lost+found"] == ["0", "0"]


def test_without_a_data_disk_the_state_is_on_tmpfs_and_it_says_so(disks):
    run = disks.run()
    assert run.facts["status"] == "0", run.output
    assert run.fstype == "tmpfs", run.output
    assert {"nosuid", "nodev", "noexec"} <= run.options
    assert run.facts["owner"] == f"{NOBODY}:{NOBODY} 750"
    warning = f"<4>portcullis-data: no data disk labelled {disks.label}: {LOST}"
    assert warning in run.said.splitlines(), run.said
    assert run.status["storage"] == "tmpfs"
    assert run.status["message"] == f"no data disk labelled {disks.label}: {LOST}"


def test_a_blank_partition_named_for_it_is_formatted_and_mounted(disks):
    partition = disks.partition("blank.img")
    run = disks.run()
    assert run.fstype == "ext4", run.output
    assert f"{partition} is a blank partition named {disks.label}: formatting it" in run.said
    assert run.facts["owner"] == f"{NOBODY}:{NOBODY} 750"
    label = subprocess.run(["blkid", "-p", "-o", "value", "-s", "LABEL", partition],
                           capture_output=True, text=True, check=False).stdout.strip()
    assert label == disks.label


def test_a_blank_partition_is_left_alone_when_formatting_is_off(disks):
    partition = disks.partition("blank.img")
    run = disks.run(data_disk_format_blank_partition=False)
    assert run.fstype == "tmpfs", run.output
    assert f"the data disk {partition} labelled {disks.label} is not used" in run.said
    found = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", partition],
                           capture_output=True, text=True, check=False).stdout
    assert found == ""  # still blank


@pytest.mark.parametrize("content", ["ext4", "ext2"])
def test_a_partition_named_for_it_that_holds_a_filesystem_is_never_formatted(disks, content):
    partition = disks.partition("used.img", content=content)
    uuid = subprocess.run(["blkid", "-p", "-o", "value", "-s", "UUID", partition],
                          capture_output=True, text=True, check=True).stdout.strip()
    run = disks.run()
    assert run.fstype == "tmpfs", run.output
    assert f"a partition named {disks.label} holding {content}: not formatting it" in run.said
    assert LOST in run.said
    after = subprocess.run(["blkid", "-p", "-o", "value", "-s", "UUID", partition],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert after == uuid


def test_a_labelled_filesystem_that_is_not_ext4_is_left_alone(disks):
    device = disks.ext4("old.img", fstype="ext2")
    run = disks.run()
    assert run.fstype == "tmpfs", run.output
    assert f"the data disk {device} labelled {disks.label} is not used (it holds ext2, not ext4" \
        in run.said
    assert run.status["storage"] == "tmpfs"


def test_two_labelled_disks_are_refused(disks):
    first, second = disks.ext4("one.img"), disks.ext4("two.img")
    run = disks.run()
    assert run.fstype == "tmpfs", run.output
    assert "2 disks are labelled" in run.said
    assert first in run.said and second in run.said


def test_a_mounted_state_directory_is_left_as_it_is(disks):
    disks.ext4("data.img")
    disks.mount_point.mkdir()
    env = {**os.environ, "PORTCULLIS_DATA_DEFAULTS": str(disks.settings())}
    twice = f'"{SCRIPT}" && "{SCRIPT}" && findmnt -n -o FSTYPE "{disks.mount_point}"'
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", twice],
                            env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is mounted already" in result.stdout
    assert result.stdout.strip().endswith("ext4")
