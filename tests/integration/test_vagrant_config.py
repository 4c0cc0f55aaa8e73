"""The Vagrant lab's management path works: Vagrantfile, vagrant-site.yaml and the image's
firewall agree.

`vagrant up` cannot run here (no libvirt), so each piece is checked against the others:
the Vagrantfile parses (`ruby -c`) and logs in to the appliance's management address; the
seed made from vagrant-site.yaml gives eth1 that address and the gate the backend VM; the
image's settings (group_vars) put sshd and the admin networks there. Then the image's
firewall, rendered by ansible-playbook from the real roles, is loaded into a network
namespace wired like the Vagrant appliance (eth0 on vagrant-libvirt's network, eth1 on
the management network) and a "Vagrant host" namespace connects to it: SSH to the
management address gets through, SSH to the public address is dropped, SMTP to the
public address gets through (synproxy).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import ipaddress
import re
import secrets
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.integration.test_rendered_config import ANSIBLE_PLAYBOOK, nft_check, render
from tests.support import netns

TOP = Path(__file__).resolve().parents[2]
VAGRANTFILE = TOP / "Vagrantfile"
SITE = TOP / "vagrant-site.yaml"
GROUP_VARS = yaml.safe_load((TOP / "ansible/group_vars/all/appliance.yml").read_text())
NFT_DEFAULTS = yaml.safe_load((TOP / "ansible/roles/nftables/defaults/main.yml").read_text())
IP = netns.IP
# vagrant-libvirt's default management network: the appliance's eth0, the Internet side.
PUBLIC_NETWORK = ipaddress.ip_network("192.168.121.0/24")


def vagrant_constant(name: str) -> str:
    found = re.search(rf'^{name} = "([^"]+)"$', VAGRANTFILE.read_text(), re.MULTILINE)
    assert found, f"the Vagrantfile defines no {name}"
    return found[1]


def make_seed():
    """scripts/make-seed as a module (it has no .py suffix)."""
    loader = importlib.machinery.SourceFileLoader("make_seed", str(TOP / "scripts" / "make-seed"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("make_seed", loader))
    loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    """The seed's files as scripts/make-seed stages them from vagrant-site.yaml (with a
    made-up admin key in place of the user's)."""
    work = tmp_path_factory.mktemp("vagrant-seed")
    shutil.copy(SITE, work / SITE.name)
    shutil.copytree(TOP / "vagrant", work / "vagrant")
    (work / "build").mkdir()
    (work / "build" / "vagrant-admin.pub").write_text(
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ1zgnbn4y2xEtBz5ZyxkKNfdbWV2bLcE7cg5T1cWMYp vagrant-test\n")
    seed = make_seed()
    site, lines = seed.load_site(str(work / SITE.name))
    staging = work / "staging"
    staging.mkdir()
    seed.stage_seed(str(work / SITE.name), site, lines, str(staging))
    return staging


def network_of(staged: Path, interface: str) -> dict[str, str]:
    text = (staged / "network" / f"{interface}.network").read_text()
    return dict(re.findall(r"^(\w+)=(.*)$", text, re.MULTILINE))


@pytest.mark.skipif(shutil.which("ruby") is None, reason="ruby not installed (apt-get install ruby)")
def test_vagrantfile_parses():
    result = subprocess.run(["ruby", "-c", str(VAGRANTFILE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_vagrant_logs_in_over_the_management_network():
    text = VAGRANTFILE.read_text()
    management = vagrant_constant("MGMT_ADDRESS")
    assert "appliance.ssh.host = MGMT_ADDRESS" in text
    assert "appliance.ssh.port = 22" in text
    assert re.search(r"private_network, ip: MGMT_ADDRESS, auto_config: false,\s+"
                     r'libvirt__network_name: "portcullis-mgmt"', text)
    # The image bakes the management address into sshd and the firewall's admin networks.
    assert management == GROUP_VARS["appliance_mgmt_address"]
    assert GROUP_VARS["appliance_mgmt_interface"] == "eth1"
    assert NFT_DEFAULTS["nftables_ssh_port"] == 22
    # vagrant-libvirt gives the host the network's first address: inside the admin networks.
    host = next(ipaddress.ip_interface(f"{management}/24").network.hosts())
    assert any(host in ipaddress.ip_network(n) for n in GROUP_VARS["appliance_admin_networks"])


def test_seed_gives_the_addresses_and_the_backend(staged):
    management = vagrant_constant("MGMT_ADDRESS")
    assert network_of(staged, "eth1") == {"Name": "eth1", "Address": f"{management}/24"}
    assert network_of(staged, "eth2") == {"Name": "eth2", "Address": f"{vagrant_constant('INTERNAL_ADDRESS')}/24"}
    assert not (staged / "network" / "eth0.network").exists(), "eth0 must stay on DHCP (vagrant-libvirt)"
    gate = make_seed().gate_config.loads((staged / "portcullis.yaml").read_text())
    assert [str(s) for s in gate.backend.servers] == [f"{vagrant_constant('BACKEND_ADDRESS')}:25"]
    assert gate.ban_socket == "/run/portcullis-ban/ban.sock"
    assert "alice@example.org" in (staged / "recipients").read_text().split()
    assert (staged / "admin_keys").read_text().startswith("ssh-ed25519 ")


LISTEN = textwrap.dedent("""\
    import socket, sys, threading
    def serve(port):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port)); s.listen(16)
        while True:
            c, _ = s.accept(); c.sendall(b"hello %d\\n" % port); c.close()
    for port in (22, 25):
        threading.Thread(target=serve, args=(port,), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()
    """)
CONNECT = textwrap.dedent("""\
    import socket, sys
    try:
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as s:
            s.settimeout(3)
            print(s.recv(64).decode().strip())
    except OSError as e:
        print("refused" if isinstance(e, ConnectionRefusedError) else "dropped")
    """)


@netns.requires_root
@pytest.mark.skipif(ANSIBLE_PLAYBOOK is None, reason="ansible-playbook not installed (scripts/install-deps ansible)")
def test_image_firewall_admits_vagrant_on_management_only(tmp_path):
    """The image's ruleset, as the Vagrant appliance runs it: a "Vagrant host" namespace
    reaches SSH on the management address only, and SMTP on the public one."""
    render(tmp_path)   # the image's settings: roles' defaults and group_vars
    nft_check(tmp_path / "out" / "nftables.conf")
    management = vagrant_constant("MGMT_ADDRESS")
    public = str(PUBLIC_NETWORK.network_address + 10)
    host_public, host_management = str(PUBLIC_NETWORK.network_address + 1), str(
        next(ipaddress.ip_interface(f"{management}/24").network.hosts()))
    with netns.namespace("vgapp") as appliance, netns.namespace("vghost") as host:
        for name, address, peer in (("eth0", public, host_public), ("eth1", management, host_management)):
            link = f"vg{secrets.token_hex(3)}"
            appliance.run([IP, "link", "add", link, "type", "veth", "peer", "name", f"{link}h",
                           "netns", host.name])
            appliance.run([IP, "link", "set", link, "name", name])
            appliance.run([IP, "addr", "add", f"{address}/24", "dev", name])
            appliance.run([IP, "link", "set", name, "up"])
            host.run([IP, "addr", "add", f"{peer}/24", "dev", f"{link}h"])
            host.run([IP, "link", "set", f"{link}h", "up"])
        appliance.run(["nft", "-f", str(tmp_path / "out" / "nftables.conf")])
        # As sysctl_dos sets it on the appliance: synproxy needs conntrack's loose pick-up off.
        appliance.run(["sysctl", "-q", "-w", "net.netfilter.nf_conntrack_tcp_loose=0"])
        server = appliance.popen([sys.executable, "-c", LISTEN], stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "ready"

        def connect(address: str, port: int) -> str:
            return host.run([sys.executable, "-c", CONNECT, address, str(port)], timeout=20).stdout.strip()

        assert connect(management, 22) == "hello 22", "Vagrant's SSH to the management address"
        assert connect(public, 22) == "dropped", "SSH on the public side"
        assert connect(public, 25) == "hello 25", "SMTP on the public side (synproxy)"
        assert connect(management, 25) == "dropped", "SMTP on the management side"
