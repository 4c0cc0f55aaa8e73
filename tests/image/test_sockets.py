"""Only SMTP listens publicly; SSH (and metrics) only on the management address."""

import pytest
import yaml


def listeners(host, proto: str) -> set[tuple[str, int]]:
    """(address, port) of every listening socket of the protocol, from ss."""
    found = set()
    for line in host.check_output(f"ss -H -ln --{proto}").splitlines():
        address, _, port = line.split()[3].rpartition(":")
        found.add((address.strip("[]").split("%")[0], int(port)))
    return found


def sshd_listen_address(host) -> tuple[str, int]:
    for line in host.check_output("sshd -T").splitlines():
        key, _, value = line.partition(" ")
        if key == "listenaddress":
            address, _, port = value.rpartition(":")
            return address.strip("[]"), int(port)
    raise AssertionError("sshd -T shows no listenaddress")


def gate_config(host) -> dict:
    return yaml.safe_load(host.file("/etc/portcullis/portcullis.yaml").content_string)


def host_port(text: str) -> tuple[str, int]:
    address, _, port = text.rpartition(":")
    return address.strip("[]"), int(port)


def gate_listen(host) -> set[tuple[str, int]]:
    """The SMTP addresses the gate is configured to listen on (25 on IPv4 and IPv6 by default)."""
    return {host_port(listen) for listen in gate_config(host).get("listen") or ["0.0.0.0:25"]}


def metrics_listen(host) -> set[tuple[str, int]]:
    listen = (gate_config(host).get("metrics") or {}).get("listen")
    return {host_port(listen)} if listen else set()


def test_ssh_listens_on_the_management_address_only(host, harden):
    address, port = sshd_listen_address(host)
    assert address not in ("0.0.0.0", "::")
    assert port == harden["harden_ssh_port"]


def test_tcp_listeners(host):
    smtp = gate_listen(host)
    assert {port for _, port in smtp} == {25}
    expected = smtp | {sshd_listen_address(host)} | metrics_listen(host)
    assert listeners(host, "tcp") == expected


def test_udp_listeners_only_dhcp_client(host):
    # systemd-networkd's DHCP client is the only UDP socket bound to a port.
    assert {port for _, port in listeners(host, "udp")} <= {68}


@pytest.mark.host
def test_gate_listens_where_configured(host):
    """The gate's SMTP and metrics listeners are up (on a host, beside the host's own)."""
    assert gate_listen(host) | metrics_listen(host) <= listeners(host, "tcp")
