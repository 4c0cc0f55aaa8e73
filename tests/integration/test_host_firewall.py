"""Loading the firewall table never cuts off the admin's SSH session that loaded it.

On an existing host (ansible/host.yml) the table is loaded over an SSH connection that
was open before: conntrack was not tracking it, so its next packets look new (or, once
sysctl_dos turns conntrack's loose pick-up off, invalid). The first of them is usually
sshd's answer, outbound. The ruleset must let the session go on both ways (found by the
molecule scenario `host`, where the run hung at the table's load).

The table is the one the roles render (ansible-playbook, as test_rendered_config does),
loaded into a network namespace between a connection's two ends.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import textwrap

import pytest

from tests.integration.test_rendered_config import ANSIBLE_PLAYBOOK, nft_check, render
from tests.support import netns

IP = netns.IP
APPLIANCE, ADMIN = "10.0.3.15", "10.0.3.2"   # the image's management address, an admin

# sshd's stand-in: echoes each line; "later" is answered after 3 s, when the table is in.
SERVER = textwrap.dedent("""\
    import socket, time
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 22)); s.listen(1)
    print("ready", flush=True)
    c, _ = s.accept(); f = c.makefile("rwb", buffering=0)
    for line in f:
        if line.strip() == b"later":
            time.sleep(3)
        c.sendall(line)
    """)
# The admin's end: sends each line of stdin, prints each answer (or "timeout").
CLIENT = textwrap.dedent("""\
    import socket, sys
    c = socket.create_connection((sys.argv[1], 22), timeout=10)
    f = c.makefile("rb")
    print("connected", flush=True)
    for line in sys.stdin:
        c.sendall(line.encode())
        try:
            print(f.readline().decode().strip() or "closed", flush=True)
        except TimeoutError:
            print("timeout", flush=True)
    """)


@netns.requires_root
@pytest.mark.skipif(ANSIBLE_PLAYBOOK is None, reason="ansible-playbook not installed (scripts/install-deps ansible)")
def test_an_open_admin_session_survives_the_table_load(tmp_path):
    render(tmp_path)   # the image's settings: eth1 management, admin networks 10.0.3.0/24
    ruleset = tmp_path / "out" / "nftables.conf"
    nft_check(ruleset)
    with netns.namespace("hfapp") as appliance, netns.namespace("hfadm") as admin:
        link = f"hf{secrets.token_hex(3)}"
        appliance.run([IP, "link", "add", link, "type", "veth", "peer", "name", f"{link}a", "netns", admin.name])
        appliance.run([IP, "link", "set", link, "name", "eth1"])
        appliance.run([IP, "addr", "add", f"{APPLIANCE}/24", "dev", "eth1"])
        appliance.run([IP, "link", "set", "eth1", "up"])
        admin.run([IP, "addr", "add", f"{ADMIN}/24", "dev", f"{link}a"])
        admin.run([IP, "link", "set", f"{link}a", "up"])
        server = appliance.popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "ready"
        client = admin.popen([sys.executable, "-c", CLIENT, APPLIANCE], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        assert client.stdout.readline().strip() == "connected"

        def say(line: str) -> None:
            client.stdin.write(line + "\n")
            client.stdin.flush()

        say("before")
        assert client.stdout.readline().strip() == "before"
        say("later")   # answered in 3 s: the answer is the first packet the table sees
        appliance.run(["nft", "-f", str(ruleset)])
        # As sysctl_dos then sets it: conntrack no longer picks up connections mid-stream.
        appliance.run(["sysctl", "-q", "-w", "net.netfilter.nf_conntrack_tcp_loose=0"])
        assert client.stdout.readline().strip() == "later", "sshd's answer after the load"
        say("after")
        assert client.stdout.readline().strip() == "after", "the admin's next command"
