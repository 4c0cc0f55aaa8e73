"""The gate and the ban helper run unprivileged, sandboxed, with one capability each."""

import re

import pytest
from conftest import main_pid, unit_property

CAP_NET_BIND_SERVICE = 1 << 10
CAP_NET_ADMIN = 1 << 12
pytestmark = pytest.mark.host  # the gate's units are the same on the image and on a host

GATE_SANDBOX = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "MemoryDenyWriteExecute": "yes",
    "CapabilityBoundingSet": "cap_net_bind_service",
    "AmbientCapabilities": "cap_net_bind_service",
}


def capabilities(host, pid: int) -> dict[str, int]:
    status = host.file(f"/proc/{pid}/status").content_string
    return {key: int(value, 16) for key, value in re.findall(r"^(Cap\w+):\s+([0-9a-f]+)$",
                                                             status, re.MULTILINE)}


@pytest.mark.parametrize("unit", ["portcullis", "portcullis-banhelper"])
def test_unit_running(host, unit):
    assert host.service(unit).is_enabled
    assert host.service(unit).is_running


@pytest.mark.parametrize("unit,user,capability", [
    ("portcullis", "portcullis", CAP_NET_BIND_SERVICE),
    ("portcullis-banhelper", "portcullis-ban", CAP_NET_ADMIN),
])
def test_runs_unprivileged_with_one_capability(host, unit, user, capability):
    pid = main_pid(host, unit)
    assert pid > 0
    assert host.check_output(f"ps -o user= -p {pid}") == user
    caps = capabilities(host, pid)
    assert caps["CapEff"] == capability
    assert caps["CapBnd"] == capability


@pytest.mark.parametrize("name", sorted(GATE_SANDBOX))
def test_gate_sandbox(host, name):
    assert unit_property(host, "portcullis", name) == GATE_SANDBOX[name]


def test_gate_address_families(host):
    families = set(unit_property(host, "portcullis", "RestrictAddressFamilies").split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6"}


def test_gate_syscall_filter_and_fd_limit(host, portcullis):
    allowed = unit_property(host, "portcullis", "SystemCallFilter").split()
    assert "socket" in allowed
    assert not {"reboot", "mount", "init_module", "ptrace"} & set(allowed)
    expected = portcullis["portcullis_max_connections"] * 2 + portcullis["portcullis_fd_headroom"]
    assert int(unit_property(host, "portcullis", "LimitNOFILE")) == expected


def test_gate_exposure_score(host):
    """systemd-analyze security: the gate's exposure is at most 2.0 ("OK")."""
    report = host.check_output("systemd-analyze security --no-pager portcullis.service")
    score = float(re.search(r"Overall exposure level for portcullis.service: ([0-9.]+)",
                            report).group(1))
    print(f"portcullis.service exposure {score}")
    assert score <= 2.0


def test_ban_socket_reachable_by_the_gate_only(host, portcullis):
    socket = host.file(portcullis["portcullis_ban_socket"])
    assert socket.is_socket
    assert socket.group == portcullis["portcullis_user"]
    assert socket.mode & 0o007 == 0
