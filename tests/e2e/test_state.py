"""State that survives: bans, reputation and the generated TLS pair live on the data disk
(label PORTCULLIS-DATA), which outlives the system disk, the boot medium and the image.

One data disk and one seed through two boots, in file order, the second from a
powered-off machine:
  1. the live ISO (its root filesystem in RAM: nothing of the system persists), on a new
     data disk made by `make data-disk`: its first use; a harvest burst from the host
     gets the host's address (10.0.2.2, the only client QEMU's user network has) banned;
     the TLS pair the gate made is fingerprinted; a clean power-off.
  2. an upgrade: a copy of the qcow2 made into a "newer image" (the gate's version marker
     changed, and the gate's user and group renumbered, as a rebuilt image may number
     them), booted with the same disks: the ban is in force before the banner and back
     in the kernel set, the certificate is the same, and the disk's files were handed
     over to the new IDs before the seed's check.
A reboot of the qcow2 with a data disk (the ban and the certificate kept) is in
test_appliance.py; a boot without one (tmpfs, and the warning) in test_boot.py.
"""

from __future__ import annotations

import contextlib
import re
import smtplib
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.appliance import Appliance, built, read_banner, require_tools
from tests.e2e.conftest import BOOT_TIMEOUT, DOMAIN, GATE_HOSTNAME, make_data_disk

CLIENT = "10.0.2.2"  # the host, as every client of QEMU's user network appears
STATE_DIR = "/var/lib/portcullis"
NEWER = "+next"  # appended to the gate's version in the "newer image"


class Scenario:
    """The machine of this module: one seed, one data disk, one booted image at a time."""

    def __init__(self, workdir: Path, seed: Path, data: Path, backend: str, figures: dict):
        self.workdir, self.seed, self.data, self.backend = workdir, seed, data, backend
        self.figures = figures
        self.box: Appliance | None = None
        self.boots = 0
        self.fingerprint = ""

    def boot(self, name: str, **image) -> Appliance:
        """Power the running box off, then boot `image` (disk= or iso=) with the same disks.
        Returns once the gate answers on the box itself (the host may be banned)."""
        self.power_off()
        self.boots += 1
        workdir = self.workdir / f"boot-{self.boots}"
        workdir.mkdir()
        self.box = Appliance(workdir, seed=self.seed, data=self.data, backend=self.backend,
                             **image)
        self.box.start()
        self.box.wait_for_ssh(BOOT_TIMEOUT)
        self.figures[f"state: {name} boot until the gate answers"] = \
            self.box.wait_for_local_banner(BOOT_TIMEOUT)
        return self.box

    def power_off(self) -> None:
        if self.box is not None and self.box.process.poll() is None:
            self.figures[f"state: power-off after boot {self.boots}"] = self.box.power_off()
            # A clean shutdown unmounted it: no journal to replay, nothing for fsck to do.
            check = subprocess.run(["e2fsck", "-fn", str(self.data)], capture_output=True,
                                   text=True, check=False)
            assert check.returncode == 0, check.stdout + check.stderr

    def stop(self) -> None:
        if self.box is not None:
            self.box.stop()


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, backend, seed, boot_figures):
    require_tools()
    workdir = tmp_path_factory.mktemp("state")
    machine = Scenario(workdir, seed, make_data_disk(workdir / "data.img"),
                       f"{backend.host}:{backend.port}", boot_figures)
    yield machine
    machine.stop()


def mount_of_state(box: Appliance) -> tuple[str, str, set[str]]:
    """FSTYPE, SOURCE and options of what is mounted on the state directory."""
    fstype, source, options = box.ssh(f"findmnt -n -o FSTYPE,SOURCE,OPTIONS {STATE_DIR}").split()
    return fstype, source, set(options.split(","))


def banned_in_kernel(box: Appliance) -> bool:
    return CLIENT in box.ssh("sudo nft list set inet portcullis portcullis_ban4")


def refused_before_the_banner(port: int) -> bool:
    return not read_banner(port, timeout=10).startswith(b"220")


def test_first_boot_of_the_live_iso_makes_the_new_data_disk_the_gates(scenario):
    box = scenario.boot("live ISO, new data disk", iso=built("iso"))
    assert box.ssh("findmnt -n -o FSTYPE /").strip() == "overlay"  # the ISO's root, in RAM
    fstype, source, options = mount_of_state(box)
    assert fstype == "ext4"
    assert {"nosuid", "nodev", "noexec"} <= options
    assert box.ssh(f"stat -c '%U:%G %a' {STATE_DIR}").strip() == "portcullis:portcullis 750"
    console = box.console()
    assert f"first use of {source}: the state directory is made portcullis's, mode 0750" in console
    assert f"state on the data disk {source}" in console
    assert "lost at reboot" not in console
    assert box.ssh("cat /run/portcullis-data/status").startswith("storage=disk\n")
    scenario.fingerprint = box.tls_fingerprint()
    assert box.ssh(f"sudo test -f {STATE_DIR}/tls/selfsigned.crt && echo yes").strip() == "yes"


def test_a_harvester_is_banned_into_the_store_on_the_data_disk(scenario, backend):
    box = scenario.box
    with contextlib.suppress(smtplib.SMTPException, OSError), \
            smtplib.SMTP("127.0.0.1", box.smtp_port, local_hostname="client.outside.example",
                         timeout=120) as client:
        client.ehlo()
        client.mail("harvester@outside.example")
        for n in range(12):
            client.rcpt(f"guess{n}@{DOMAIN}")
    deadline = time.monotonic() + 30
    while not refused_before_the_banner(box.smtp_port):
        assert time.monotonic() < deadline, "the harvester was not banned"
        time.sleep(1)
    assert banned_in_kernel(box)
    assert box.ssh(f"sudo test -s {STATE_DIR}/reputation.db && echo yes").strip() == "yes"
    backend.assert_no_bounce()


@pytest.fixture(scope="module")
def newer_image(tmp_path_factory) -> dict:
    """The built qcow2, copied into a "newer" image: see make_newer_image."""
    started = time.monotonic()
    image = make_newer_image(built("qcow2"), tmp_path_factory.mktemp("newer") / "newer.qcow2")
    image["seconds"] = time.monotonic() - started
    return image


def test_ban_and_tls_pair_survive_an_upgrade_to_a_newer_image(scenario, newer_image):
    scenario.figures["state: making the newer image"] = newer_image["seconds"]
    box = scenario.boot("newer qcow2", disk=newer_image["path"])
    version = box.ssh("sudo /opt/portcullis/bin/portcullis --version").strip()
    assert version == f"portcullis {newer_image['version']}"
    assert box.ssh("id -u portcullis").strip() == str(newer_image["uid"])
    fstype, _, options = mount_of_state(box)
    assert fstype == "ext4" and {"nosuid", "nodev", "noexec"} <= options
    assert refused_before_the_banner(box.smtp_port), "the ban was not in force after the upgrade"
    assert banned_in_kernel(box), "the ban was not restored into the kernel set"
    assert "active bans to the ban helper" in box.ssh("sudo journalctl -b -o cat -u portcullis")
    assert box.tls_fingerprint() == scenario.fingerprint
    # The disk's files were the old IDs': handed over before the seed's check ran as the gate.
    old = f"{newer_image['old_uid']}:{newer_image['old_gid']}"
    assert f"its files belong to {old}, the gate is portcullis" in box.console()
    owners = box.ssh(f"sudo find {STATE_DIR} -path {STATE_DIR}/lost+found -prune -o "
                     "-printf '%U:%G\\n' | sort -u").split()
    assert owners == [f"{newer_image['uid']}:{newer_image['gid']}"]
    assert box.ssh("sudo systemctl is-active portcullis-seed.service", check=False).strip() == "active"
    assert box.local_banner().startswith(f"220 {GATE_HOSTNAME}")
    scenario.power_off()


# --- the newer image ------------------------------------------------------------------

def make_newer_image(source: Path, out: Path) -> dict:
    """A copy of the image as a later build would differ, short of building one (7 min):
    the gate's version marker (portcullis.__version__) gets NEWER appended, and the gate's
    user and group get new IDs, with every file of the old IDs handed to the new ones,
    as a rebuild that created another system user first would number them. Edited on
    the root partition (the third) of a raw copy, attached to a loop device."""
    raw = out.with_suffix(".raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(source), str(raw)], check=True)
    loop = subprocess.run(["losetup", "--find", "--show", "-P", str(raw)], check=True,
                          capture_output=True, text=True).stdout.strip()
    mnt = out.parent / "root"
    mnt.mkdir()
    try:
        if not Path(f"{loop}p3").exists():  # the host's kernel may not scan partitions
            subprocess.run(["partx", "-a", loop], check=True, capture_output=True)
        subprocess.run(["mount", f"{loop}p3", str(mnt)], check=True)
        try:
            facts = edit_root(mnt)
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        subprocess.run(["partx", "-d", loop], check=False, capture_output=True)
        subprocess.run(["losetup", "--detach", loop], check=False, capture_output=True)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(out)], check=True)
    raw.unlink()
    return {"path": out, **facts}


def edit_root(root: Path) -> dict:
    (init,) = root.glob("opt/portcullis/lib/python3*/site-packages/portcullis/__init__.py")
    text = init.read_text()
    old_version = re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE).group(1)
    init.write_text(text.replace(f'__version__ = "{old_version}"',
                                 f'__version__ = "{old_version}{NEWER}"'))
    passwd, group = root / "etc/passwd", root / "etc/group"
    users = [line.split(":") for line in passwd.read_text().splitlines()]
    groups = [line.split(":") for line in group.read_text().splitlines()]
    old_uid = next(int(u[2]) for u in users if u[0] == "portcullis")
    old_gid = next(int(g[2]) for g in groups if g[0] == "portcullis")
    taken = {int(u[2]) for u in users} | {int(g[2]) for g in groups}
    new_id = next(n for n in range(980, 100, -1) if n not in taken)
    for u in users:
        if u[0] == "portcullis":
            u[2] = str(new_id)
        if u[3] == str(old_gid):  # the ban helper's primary group is the gate's
            u[3] = str(new_id)
    for g in groups:
        if g[0] == "portcullis":
            g[2] = str(new_id)
    passwd.write_text("".join(":".join(u) + "\n" for u in users))
    group.write_text("".join(":".join(g) + "\n" for g in groups))
    for option, old in (("-uid", old_uid), ("-gid", old_gid)):
        change = ["chown", "-h", str(new_id)] if option == "-uid" else ["chgrp", "-h", str(new_id)]
        subprocess.run(["find", str(root), "-xdev", option, str(old), "-exec", *change, "{}", "+"],
                       check=True)
    return {"version": old_version + NEWER, "uid": new_id, "gid": new_id,
            "old_uid": old_uid, "old_gid": old_gid}
