"""The boot-time seed applier (ansible/roles/seed/files/portcullis-seed), run for real.

As root, on an ISO 9660 seed written by scripts/make-seed and attached to a loop device,
with nftables in a private network namespace holding the `inet portcullis` table. The
script's settings are rendered from the seed role's template, with every path in a
temporary directory; each seed has a label of its own, so the script never finds a disk
of the host. Throwaway users play the gate and the administrator. Users, loop devices,
mounts and the namespace are removed afterwards.

`ip netns exec` runs each command in a mount namespace of its own, so the seed's mount is
seen by that run only. There, two shims may be mounted first: where the kernel has no
ISO 9660 driver (as on the CI machines), `mount -t iso9660` is served by fuseiso through
a mount helper (mount.iso9660); and directories the gate's user could not traverse to
reach the venv's Python (pyenv under /root) are made traversable.
"""

from __future__ import annotations

import contextlib
import grp
import importlib.machinery
import importlib.util
import os
import pwd
import secrets
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import jinja2
import pytest
import yaml

from tests.support import netns
from tests.support.tools import require_tool, run_checked

pytestmark = [pytest.mark.netns, netns.requires_root]

TOP = Path(__file__).resolve().parents[2]
SCRIPT = TOP / "ansible/roles/seed/files/portcullis-seed"
SETTINGS_TEMPLATE = TOP / "ansible/roles/seed/templates/portcullis-seed.default.j2"
VENV_BIN = Path(sys.prefix) / "bin"
TABLE = """\
table inet portcullis {
    chain output {
        type filter hook output priority filter; policy drop;
        oif "lo" accept
    }
}
"""
# mount(8) runs /sbin/mount.TYPE DEVICE DIR [-o OPTIONS] ...: hand the options to fuseiso.
FUSE_HELPER = """\
#!/bin/sh
device=$1 dir=$2 options=ro
shift 2
while [ $# -gt 0 ]; do [ "$1" = -o ] && options=$2; shift; done
exec fuseiso -n "$device" "$dir" -o "$options"
"""
OLD_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOLD old@laptop"
SEED_KEYS = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINEW1 admin@site\n"
             "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAINEW2 admin@desk\n")


def load_make_seed():
    """scripts/make-seed as a module (its file name has no .py)."""
    loader = importlib.machinery.SourceFileLoader("make_seed", str(TOP / "scripts/make-seed"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("make_seed", loader))
    loader.exec_module(module)
    return module


def kernel_has_iso9660() -> bool:
    with contextlib.suppress(OSError):  # no modprobe, no modules: fine, /proc says
        subprocess.run(["modprobe", "-q", "isofs"], check=False, capture_output=True)
    return "iso9660" in Path("/proc/filesystems").read_text().split()


def gate_config(box: Box, **sections) -> str:
    """A valid portcullis.yaml for the box; keyword arguments replace top-level sections."""
    config = {"hostname": "mx.example.test", "relay_domains": ["example.test"],
              "state_dir": str(box.state_dir), "tls": {"generated_dir": f"{box.state_dir}/tls"},
              "recipients": {"file": f"{box.config_dir}/recipients"},
              "backend": {"servers": ["192.0.2.25:25"]}}
    config.update(sections)
    return yaml.safe_dump(config)


def ldap_recipients(url: str) -> dict:
    # make-seed wants this file name; with source ldap the gate does not read it.
    return {"source": "ldap", "file": "/etc/portcullis/recipients",
            "ldap": {"url": url, "base": "dc=example,dc=test"}}


class Box:
    """One appliance's paths, users and namespace, all temporary."""

    def __init__(self, root: Path, ns: netns.Namespace, gate_user: str, admin_user: str,
                 admin_group: str):
        self.root, self.ns = root, ns
        self.gate_user, self.admin_user, self.admin_group = gate_user, admin_user, admin_group
        self.config_dir = root / "portcullis"
        self.network_dir = root / "network"
        self.home = root / "home"
        self.mount_dir = root / "seed-mount"
        self.state_dir = root / "state"  # made by the fixture, the gate's user's
        self.label = f"PCTEST-{secrets.token_hex(4).upper()}"
        self.make_seed = load_make_seed()
        self._seeds = 0

    def seed_dir(self, config: str | None = None) -> Path:
        """A new seed's staging directory with a portcullis.yaml and recipients."""
        self._seeds += 1
        staging = self.root / f"seed-{self._seeds}"
        staging.mkdir()
        (staging / "portcullis.yaml").write_text(config or gate_config(self))
        (staging / "recipients").write_text("alice@example.test\n")
        return staging

    def iso(self, seed: Path) -> Path:
        """An ISO of the staging directory, written by make-seed's writer with our label."""
        self.make_seed.LABEL = self.label
        out = seed.with_suffix(".iso")
        self.make_seed.write_iso(str(seed), str(out))
        return out

    def settings(self, **overrides) -> Path:
        values = {
            "ansible_managed": "test_seed_script", "seed_label": self.label,
            "seed_wait_seconds": 3, "seed_gate_command": str(VENV_BIN / "portcullis"),
            "seed_gate_python": str(VENV_BIN / "python"), "seed_gate_user": self.gate_user,
            "seed_config_dir": str(self.config_dir), "seed_admin_user": self.admin_user,
            "seed_admin_group": self.admin_group, "seed_nftables_table": "inet portcullis",
            "seed_network_dir": str(self.network_dir), "seed_mount_dir": str(self.mount_dir),
        } | overrides
        template = jinja2.Template(SETTINGS_TEMPLATE.read_text(), undefined=jinja2.StrictUndefined)
        path = self.root / "portcullis-seed.default"
        path.write_text(template.render(values))
        return path

    def apply(self, seed: Path, **settings) -> subprocess.CompletedProcess:
        """Attach the seed (a staging directory or an ISO) and run the script on it."""
        iso = self.iso(seed) if seed.is_dir() else seed
        device = subprocess.run(["losetup", "--find", "--show", "--read-only", str(iso)],
                                check=True, capture_output=True, text=True).stdout.strip()
        try:
            argv = ["sh", "-c", self._prelude(), "sh", "env",
                    f"PORTCULLIS_SEED_DEFAULTS={self.settings(**settings)}", "/bin/sh", str(SCRIPT)]
            result = self.ns.run(argv, check=False, timeout=120)
            result.output = result.stdout + result.stderr
            return result
        finally:
            stop_fuse_daemons(device)
            subprocess.run(["losetup", "--detach", device], check=False, capture_output=True)

    def _prelude(self) -> str:
        """Shell run in the command's own mount namespace before the script: the shims."""
        mounts = []
        if not kernel_has_iso9660():
            require_tool("fuseiso", "fuseiso")
            helpers = self.root / "mount-helpers"
            helpers.mkdir(exist_ok=True)
            (helpers / "mount.iso9660").write_text(FUSE_HELPER)
            (helpers / "mount.iso9660").chmod(0o755)
            mounts.append((helpers, Path("/sbin").resolve()))
        python = Path(os.path.realpath(VENV_BIN / "python"))
        for number, parent in enumerate(python.parents):
            if not parent.stat().st_mode & stat.S_IXOTH:
                shim = self.root / f"traversable-{number}"
                shim.mkdir(exist_ok=True)
                shim.chmod(0o711)  # its mode is the merged directory's
                mounts.append((shim, parent))
        lines = [f"mount -t overlay overlay -o lowerdir={top}:{under} {under}"
                 for top, under in mounts]
        return " && ".join([*lines, 'exec "$@"'])

    def rules(self) -> str:
        return self.ns.run(["nft", "list", "chain", "inet", "portcullis", "output"]).stdout

    def authorized_keys(self) -> Path:
        return self.home / ".ssh" / "authorized_keys"


def stop_fuse_daemons(device: str) -> None:
    """A fuseiso left on the device (the script died before unmounting) is stopped."""
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            args = (proc / "cmdline").read_bytes().split(b"\0")
            if args[0].endswith(b"fuseiso") and device.encode() in args:
                os.kill(int(proc.name), signal.SIGTERM)


@pytest.fixture
def box():
    require_tool("xorriso", "xorriso")
    suffix = secrets.token_hex(3)
    gate_user, admin_user, admin_group = (f"pcseed-{role}{suffix}" for role in "gas")
    root = Path(tempfile.mkdtemp(prefix="portcullis-seed-test."))
    root.chmod(0o755)  # the gate's user reads the config dir below it
    created: list[list[str]] = []
    try:
        for create, remove in (
            (["groupadd", admin_group], ["groupdel", admin_group]),
            (["useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
              "/nonexistent", "--shell", "/usr/sbin/nologin", gate_user], ["userdel", gate_user]),
            (["useradd", "--user-group", "--no-create-home", "--home-dir", str(root / "home"),
              "--shell", "/bin/sh", admin_user], ["userdel", admin_user]),
        ):
            run_checked(create)
            created.append(remove)
        (root / "home").mkdir(mode=0o755)
        os.chown(root / "home", pwd.getpwnam(admin_user).pw_uid, grp.getgrnam(admin_user).gr_gid)
        (root / "network").mkdir()
        (root / "state").mkdir()
        os.chown(root / "state", pwd.getpwnam(gate_user).pw_uid, -1)
        with netns.namespace("seed") as ns:
            ns.run(["nft", "-f", "-"], input=TABLE)
            yield Box(root, ns, gate_user, admin_user, admin_group)
    finally:
        for remove in reversed(created):
            subprocess.run(remove, check=False, capture_output=True)
        run_checked(["rm", "-rf", "--one-file-system", str(root)])


def assert_failed_closed(result, *words):
    assert result.returncode == 1, result.output
    assert "portcullis-seed: FAILED:" in result.output
    assert "the mail gate stays closed" in result.output
    assert "the gate may start" not in result.output
    for word in words:
        assert word in result.output


# --- the happy path ---------------------------------------------------------------------

def test_a_valid_seed_is_applied_whole(box):
    """make-seed's seed: config, recipients, exactly the seed's keys, network, firewall."""
    site = box.root / "site"
    site.mkdir()
    config = gate_config(
        box, recipients=ldap_recipients("ldaps://192.0.2.38"),
        backend={"servers": ["192.0.2.25:25", "[2001:db8::25]:2525"]},
        dns={"nameservers": ["192.0.2.53:53", "[2001:db8::53]:5353"]})
    (site / "portcullis.yaml").write_text(config)
    (site / "recipients").write_text("alice@example.test\n")
    (site / "admin.pub").write_text(SEED_KEYS)
    (site / "site.yaml").write_text(textwrap.dedent("""\
        gate_config: portcullis.yaml
        recipients: recipients
        admin_keys: admin.pub
        network:
          - interface: eth1
            address: 192.0.2.10/24
            gateway: 192.0.2.1
        """))
    box.make_seed.LABEL = box.label
    assert box.make_seed.main([str(site / "site.yaml"), str(box.root / "seed.iso")]) == 0
    box.authorized_keys().parent.mkdir(mode=0o700)
    box.authorized_keys().write_text(OLD_KEY + "\n")
    (box.network_dir / "10-seed-old.network").write_text("[Match]\nName=old0\n")

    result = box.apply(box.root / "seed.iso")

    assert result.returncode == 0, result.output
    assert "applied the seed" in result.output
    installed = box.config_dir / "portcullis.yaml"
    assert installed.read_text() == config
    assert stat.S_IMODE(installed.stat().st_mode) == 0o640
    assert installed.stat().st_gid == grp.getgrnam(box.gate_user).gr_gid
    assert (box.config_dir / "recipients").read_text() == "alice@example.test\n"
    keys = box.authorized_keys()
    assert keys.read_text() == SEED_KEYS
    assert (keys.stat().st_uid, stat.S_IMODE(keys.stat().st_mode)) == (
        pwd.getpwnam(box.admin_user).pw_uid, 0o600)
    assert box.admin_user in grp.getgrnam(box.admin_group).gr_mem
    assert sorted(p.name for p in box.network_dir.iterdir()) == ["10-seed-eth1.network"]
    assert "Address=192.0.2.10/24" in (box.network_dir / "10-seed-eth1.network").read_text()
    rules = box.rules()
    for rule in ("ip daddr 192.0.2.25 tcp dport 25 accept",
                 "ip6 daddr 2001:db8::25 tcp dport 2525 accept",
                 "ip daddr 192.0.2.38 tcp dport 636 accept",
                 "ip daddr 192.0.2.53 udp dport 53 accept",
                 "ip daddr 192.0.2.53 tcp dport 53 accept",
                 "ip6 daddr 2001:db8::53 udp dport 5353 accept",
                 "ip6 daddr 2001:db8::53 tcp dport 5353 accept"):
        assert rule in rules


def test_an_invalid_config_fails_closed(box):
    seed = box.seed_dir(gate_config(box, relay_domains=[]))
    result = box.apply(seed)
    assert_failed_closed(result, "relay_domains")
    assert not (box.config_dir / "portcullis.yaml").exists()
    assert (box.config_dir / "portcullis.yaml.rejected").exists()
    assert "192.0.2.25" not in box.rules()


# --- 1: links and special files on the seed are refused -------------------------------

# A device's name fits ISO 9660's 8.3: fuseiso shows devices by that name, not Rock Ridge's.
@pytest.mark.parametrize("name", ["network/x.network", "tls/key.pem", "recipients", "tls/cert.pem"])
def test_links_and_special_files_on_the_seed_are_refused(box, name):
    seed = box.seed_dir()
    (seed / "network").mkdir()
    (seed / "tls").mkdir()
    (seed / "tls/cert.pem").write_text("not read\n")
    (seed / "tls/key.pem").write_text("not read\n")
    odd = seed / name
    odd.unlink(missing_ok=True)
    if name == "recipients":
        os.mkfifo(odd)
    elif name == "tls/cert.pem":
        os.mknod(odd, stat.S_IFCHR | 0o644, os.makedev(1, 3))  # as /dev/null
    else:
        odd.symlink_to("/etc/shadow")
    result = box.apply(seed)
    assert_failed_closed(result, name, "not a regular file or directory")
    assert not (box.config_dir / "portcullis.yaml").exists()
    assert list(box.network_dir.iterdir()) == []


# --- 2: the seed is mounted read-only, nosuid, nodev, noexec --------------------------

def test_the_seed_is_mounted_nosuid_nodev_noexec(box):
    # The gate's check runs while the seed is mounted: a wrapper notes the mount first.
    record = box.root / "mount-record"
    record.mkdir()
    os.chown(record, pwd.getpwnam(box.gate_user).pw_uid, -1)
    wrapper = box.root / "gate-command"
    wrapper.write_text(f"#!/bin/sh\ngrep ' {box.mount_dir} ' /proc/self/mountinfo"
                       f" > {record}/mountinfo\nexec {VENV_BIN / 'portcullis'} \"$@\"\n")
    wrapper.chmod(0o755)
    result = box.apply(box.seed_dir(), seed_gate_command=str(wrapper))
    assert result.returncode == 0, result.output
    options = (record / "mountinfo").read_text().split()[5].split(",")
    assert {"ro", "nosuid", "nodev", "noexec"} <= set(options)


# --- 3: the first failed step stops the script, which fails closed ---------------------

def test_a_failed_install_stops_and_fails_closed(box):
    box.config_dir.mkdir()
    (box.config_dir / "tls").write_text("a stray file where the TLS directory goes\n")
    seed = box.seed_dir()
    (seed / "tls").mkdir()
    (seed / "tls/cert.pem").write_text("cert\n")
    (seed / "tls/key.pem").write_text("key\n")
    result = box.apply(seed)
    assert_failed_closed(result, "TLS")
    assert "192.0.2.25" not in box.rules()


# --- 4: authorized_keys holds exactly the seed's keys ----------------------------------

def test_without_admin_keys_on_the_seed_old_keys_stop_working(box):
    box.authorized_keys().parent.mkdir(mode=0o700)
    box.authorized_keys().write_text(OLD_KEY + "\n")
    result = box.apply(box.seed_dir())
    assert result.returncode == 0, result.output
    keys = box.authorized_keys()
    assert not keys.exists() or keys.read_text() == ""


# --- 5: the firewall opens every server the config names --------------------------------

@pytest.mark.parametrize(("url", "rule"), [
    ("ldap://192.0.2.38", "ip daddr 192.0.2.38 tcp dport 389 accept"),
    ("ldaps://192.0.2.38", "ip daddr 192.0.2.38 tcp dport 636 accept"),
    ("ldap://[2001:db8::38]:3389", "ip6 daddr 2001:db8::38 tcp dport 3389 accept"),
])
def test_the_ldap_server_is_opened(box, url, rule):
    seed = box.seed_dir(gate_config(box, recipients=ldap_recipients(url)))
    result = box.apply(seed)
    assert result.returncode == 0, result.output
    assert rule in box.rules()


def test_dns_servers_are_opened_for_udp_and_tcp(box):
    seed = box.seed_dir(gate_config(box, dns={"nameservers": ["192.0.2.53:53"]}))
    result = box.apply(seed)
    assert result.returncode == 0, result.output
    rules = box.rules()
    assert "ip daddr 192.0.2.53 udp dport 53 accept" in rules
    assert "ip daddr 192.0.2.53 tcp dport 53 accept" in rules


@pytest.mark.parametrize(("section", "value", "host"), [
    ("backend", {"servers": ["mail.example.test:25"]}, "mail.example.test"),
    ("recipients", ldap_recipients("ldap://ldap.example.test"), "ldap.example.test"),
    ("dns", {"nameservers": ["dns.example.test:53"]}, "dns.example.test"),
    ("reputation", {"store": "redis", "redis": {"url": "redis://store.example.test/0"}}, "store.example.test"),
])
def test_a_server_named_by_host_name_fails_closed(box, section, value, host):
    result = box.apply(box.seed_dir(gate_config(box, **{section: value})))
    assert_failed_closed(result, host, "must be an IP address")
    assert "accept" not in box.rules().split('oif "lo" accept', 1)[1]


@pytest.mark.parametrize(("url", "rule"), [
    ("redis://192.0.2.63/0", "ip daddr 192.0.2.63 tcp dport 6379 accept"),
    ("rediss://[2001:db8::63]:6380/0", "ip6 daddr 2001:db8::63 tcp dport 6380 accept"),
])
def test_the_fleet_store_is_opened(box, url, rule):
    seed = box.seed_dir(gate_config(box, reputation={"store": "redis", "redis": {"url": url}}))
    result = box.apply(seed)
    assert result.returncode == 0, result.output
    assert rule in box.rules()


# --- 6: the fleet store's settings and files, from make-seed's fleet_store ---------------

FLEET_PASSWORD = "fleet-seed-password"


def make_ca(directory: Path) -> Path:
    """A throw-away CA certificate, made by openssl."""
    openssl = require_tool("openssl", "openssl")
    run_checked([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-keyout", str(directory / "fleet-ca.key"), "-out", str(directory / "fleet-ca.pem"),
                 "-days", "2", "-subj", "/CN=Portcullis test fleet CA"])
    return directory / "fleet-ca.pem"


def test_a_fleet_store_is_set_at_boot(box):
    """make-seed's fleet_store: the seed's portcullis.yaml uses the store, its password is
    installed readable by root and the gate's group only, its CA for everyone, and the
    firewall opens the store. A later seed without one leaves no password behind."""
    box.make_seed.BOX_CONFIG_DIR = str(box.config_dir)  # the paths make-seed writes into the config
    site = box.root / "site"
    site.mkdir()
    (site / "portcullis.yaml").write_text(gate_config(box))
    (site / "recipients").write_text("alice@example.test\n")
    (site / "fleet.pass").write_text(FLEET_PASSWORD + "\n")
    ca = make_ca(site)
    (site / "site.yaml").write_text(textwrap.dedent("""\
        gate_config: portcullis.yaml
        recipients: recipients
        fleet_store:
          url: rediss://192.0.2.63:6380/0
          username: gate
          password_file: fleet.pass
          ca_file: fleet-ca.pem
        """))
    box.make_seed.LABEL = box.label
    assert box.make_seed.main([str(site / "site.yaml"), str(box.root / "seed.iso")]) == 0

    result = box.apply(box.root / "seed.iso")

    assert result.returncode == 0, result.output
    store = box.config_dir / "fleet-store"
    installed = yaml.safe_load((box.config_dir / "portcullis.yaml").read_text())
    assert installed["reputation"] == {"store": "redis", "redis": {
        "url": "rediss://192.0.2.63:6380/0", "username": "gate",
        "password_file": f"{store}/password", "ca_file": f"{store}/ca.pem"}}
    gate_gid = grp.getgrnam(box.gate_user).gr_gid
    for path, mode, gid in ((store, 0o750, gate_gid), (store / "password", 0o640, gate_gid),
                            (store / "ca.pem", 0o644, 0)):
        info = path.stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, gid, mode), path
    assert (store / "password").read_text() == FLEET_PASSWORD + "\n"
    assert (store / "ca.pem").read_bytes() == ca.read_bytes()
    assert "ip daddr 192.0.2.63 tcp dport 6380 accept" in box.rules()
    assert "firewall open to fleet-store server 192.0.2.63 tcp/6380" in result.output

    result = box.apply(box.seed_dir())
    assert result.returncode == 0, result.output
    assert not store.exists()


MINIMAL_GATE = {"hostname": "mx.example.test", "relay_domains": ["example.test"],
                "backend": {"servers": ["192.0.2.25:25"]}}


@pytest.mark.parametrize(("fleet_store", "reputation", "words"), [
    ({"url": "redis://store.example.test/0"}, None, ["fleet_store.url", "IP address"]),
    ({"url": "redis://192.0.2.63/0", "ca_file": "fleet.pass"}, None, ["fleet_store.ca_file", "rediss://"]),
    ({"url": "redis://192.0.2.63/0", "password": "inline"}, None, ["fleet_store", "needs 'url'"]),
    ({"username": "gate"}, None, ["fleet_store", "needs 'url'"]),
    ({"url": "redis://192.0.2.63/0", "password_file": "missing.pass"}, None, ["no such file"]),
    ({"url": "redis://192.0.2.63/0", "password_file": "empty.pass"}, None, ["first line", "empty"]),
    ({"url": "rediss://192.0.2.63/0", "ca_file": "fleet.pass"}, None, ["not a PEM CA certificate"]),
    ({"url": "redis://192.0.2.63/0"}, {"store": "sqlite"}, ["reputation.store", "make it redis"]),
    ({"url": "redis://192.0.2.63/0", "username": "gate"}, {"redis": {"username": "other"}},
     ["reputation.redis.username", "leave it out"]),
])
def test_make_seed_refuses_a_bad_fleet_store(tmp_path, capsys, fleet_store, reputation, words):
    gate = MINIMAL_GATE | ({"reputation": reputation} if reputation else {})
    (tmp_path / "portcullis.yaml").write_text(yaml.safe_dump(gate))
    (tmp_path / "fleet.pass").write_text(FLEET_PASSWORD + "\n")
    (tmp_path / "empty.pass").write_text("\n" + FLEET_PASSWORD + "\n")
    (tmp_path / "site.yaml").write_text(yaml.safe_dump({"gate_config": "portcullis.yaml",
                                                        "fleet_store": fleet_store}))
    assert load_make_seed().main([str(tmp_path / "site.yaml"), str(tmp_path / "seed.iso")]) == 1
    error = capsys.readouterr().err
    assert "site.yaml line " in error or "portcullis.yaml" in error
    for word in words:
        assert word in error
    assert not (tmp_path / "seed.iso").exists()

