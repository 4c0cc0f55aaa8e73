"""`portcullis status`'s state line: which mount holds the state directory, read from a
mountinfo file (proc(5)) written here."""

from portcullis.operator import state_storage

MOUNTINFO = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
25 22 0:23 / /run rw,nosuid,nodev shared:5 - tmpfs tmpfs rw,mode=755
30 22 0:31 / /var/lib/portcullis rw,nosuid,nodev,noexec shared:9 - tmpfs tmpfs rw,size=65536k
31 30 254:16 / /var/lib/portcullis rw,nosuid,nodev,noexec shared:10 - ext4 /dev/vdb rw
32 22 254:32 / /srv/mail\\040spool rw,relatime shared:11 - xfs /dev/disk\\040one rw
33 22 0:40 / /var/lib/portcullis-old rw shared:12 - tmpfs tmpfs rw
"""


def storage(tmp_path, path: str, mounts: str = MOUNTINFO) -> str:
    (tmp_path / "mountinfo").write_text(mounts)
    return state_storage(path, str(tmp_path / "mountinfo"))


def test_the_data_disk_mounted_over_the_tmpfs_is_named(tmp_path):
    assert storage(tmp_path, "/var/lib/portcullis") == "/var/lib/portcullis on /dev/vdb (ext4)"


def test_a_directory_inside_a_mount_is_on_that_mount(tmp_path):
    assert storage(tmp_path, "/var/lib/portcullis/state") == (
        "/var/lib/portcullis/state on /dev/vdb (ext4)")
    assert storage(tmp_path, "/var/lib/other") == "/var/lib/other on /dev/vda1 (ext4)"


def test_a_longer_name_sharing_the_prefix_is_another_mount(tmp_path):
    assert storage(tmp_path, "/var/lib/portcullis-old") == (
        "/var/lib/portcullis-old on tmpfs: bans, reputation and the TLS pair are lost at reboot")


def test_state_in_memory_says_it_is_lost_at_reboot(tmp_path):
    without_disk = "".join(line + "\n" for line in MOUNTINFO.splitlines() if "vdb" not in line)
    assert storage(tmp_path, "/var/lib/portcullis", without_disk) == (
        "/var/lib/portcullis on tmpfs: bans, reputation and the TLS pair are lost at reboot")


def test_escaped_spaces_in_mount_points_and_sources(tmp_path):
    assert storage(tmp_path, "/srv/mail spool/state") == (
        "/srv/mail spool/state on /dev/disk one (xfs)")


def test_an_unreadable_or_odd_mountinfo_is_said_not_raised(tmp_path):
    assert state_storage("/var/lib/portcullis", str(tmp_path / "missing")) == (
        f"/var/lib/portcullis (cannot read {tmp_path}/missing: No such file or directory)")
    assert storage(tmp_path, "/var/lib/portcullis", "garbage\n\n1 2 3 - \n") == (
        f"/var/lib/portcullis (on no mount listed in {tmp_path}/mountinfo)")
