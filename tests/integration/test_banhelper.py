"""The privileged ban helper and its client, against real nftables in a namespace.

Each helper runs as its own process (`python -m portcullis.banhelper`) inside a fresh
network namespace holding a minimal `inet portcullis` table with the two ban sets, so
the host's ruleset is never touched. Requests travel over the real Unix socket.
"""

import asyncio
import contextlib
import json
import socket
import sys
import time

import pytest
from portcullis.firewall import BanClient, BanHelperError

from tests.support import netns


def in_namespace(test):
    """Marks a test that runs a helper in a network namespace (root only)."""
    return pytest.mark.netns(netns.requires_root(test))


RULESET = """
table inet portcullis {
    set portcullis_ban4 { type ipv4_addr; flags timeout; }
    set portcullis_ban6 { type ipv6_addr; flags timeout; }
}
"""
START_TIMEOUT = 10.0


class RunningHelper:
    def __init__(self, namespace: netns.Namespace, socket_path: str, process):
        self.namespace = namespace
        self.socket_path = socket_path
        self.process = process

    def connect(self) -> socket.socket:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(5)
        client.connect(self.socket_path)
        return client

    def ask(self, *lines: bytes) -> list[str]:
        """Send lines on one connection; return one status line per request."""
        with self.connect() as client, client.makefile("rwb") as stream:
            answers = []
            for line in lines:
                stream.write(line + b"\n")
                stream.flush()
                answers.append(stream.readline().decode().rstrip("\n"))
            return answers

    def elements(self, set_name: str) -> dict[str, int]:
        """The set's elements and their timeouts in seconds, as nft lists them."""
        listed = self.namespace.run(["nft", "-j", "list", "set", "inet", "portcullis", set_name])
        (entry,) = [item["set"] for item in json.loads(listed.stdout)["nftables"]
                    if "set" in item]
        return {e["elem"]["val"]: e["elem"]["timeout"] for e in entry.get("elem", [])}


@pytest.fixture
def start_helper(tmp_path):
    """Start a helper with extra YAML for its config; stopped with its namespace."""
    with contextlib.ExitStack() as stack:
        def start(extra: str = "", own_address: str = "",
                  backend: str = "127.0.0.1:2525") -> RunningHelper:
            namespace = stack.enter_context(netns.namespace("ban"))
            namespace.run(["nft", "-f", "-"], input=RULESET)
            if own_address:
                namespace.run(["ip", "address", "add", own_address, "dev", "lo"])
            socket_path = str(tmp_path / f"{namespace.name}.sock")
            config_path = tmp_path / f"{namespace.name}.yaml"
            config_path.write_text(
                "relay_domains: [example.test]\n"
                f"backend: {{servers: ['{backend}']}}\n"
                f"ban_socket: {socket_path}\n"
                "allowlist: [198.51.100.0/24]\n"
                "ban_helper:\n"
                "  socket_group: ''\n"
                "  never_ban: [203.0.113.0/24]\n"
                "  max_seconds: 86400\n" + extra)
            process = namespace.popen([sys.executable, "-m", "portcullis.banhelper",
                                       "--config", str(config_path)])
            helper = RunningHelper(namespace, socket_path, process)
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                assert process.poll() is None, "the ban helper exited at start"
                try:
                    helper.connect().close()
                    return helper
                except OSError:
                    assert time.monotonic() < deadline, "the ban helper did not listen"
                    time.sleep(0.05)

        yield start


@in_namespace
def test_a_ban_lands_in_the_nftables_set_with_its_timeout(start_helper):
    helper = start_helper()
    assert helper.ask(b"ban 192.0.2.1 3600", b"ban 2001:db8::7 600") == [
        "OK banned 192.0.2.1 for 3600s", "OK banned 2001:db8::7 for 600s"]
    assert helper.elements("portcullis_ban4") == {"192.0.2.1": 3600}
    assert helper.elements("portcullis_ban6") == {"2001:db8::7": 600}


@in_namespace
def test_banning_again_replaces_the_timeout(start_helper):
    helper = start_helper()
    helper.ask(b"ban 192.0.2.1 3600")
    assert helper.ask(b"ban 192.0.2.1 120") == ["OK banned 192.0.2.1 for 120s"]
    assert helper.elements("portcullis_ban4") == {"192.0.2.1": 120}


@in_namespace
def test_an_ipv4_mapped_address_goes_into_the_ipv4_set(start_helper):
    helper = start_helper()
    assert helper.ask(b"ban ::ffff:192.0.2.9 60") == ["OK banned 192.0.2.9 for 60s"]
    assert helper.elements("portcullis_ban4") == {"192.0.2.9": 60}


@in_namespace
@pytest.mark.parametrize(("request_line", "status"), [
    (b"ban 999.1.1.1 60", "ERR address: '999.1.1.1' is not an IP address"),
    (b"ban example.org 60", "ERR address: 'example.org' is not an IP address"),
    (b"ban 192.0.2.1;flush 60", "ERR address: '192.0.2.1;flush' is not an IP address"),
    (b"ban fe80::1%eth0 60", "ERR address: 'fe80::1%eth0' is not an IP address"),
    (b"ban 127.0.0.1 60", "ERR address: 127.0.0.1 is loopback, never banned"),
    (b"ban ::1 60", "ERR address: ::1 is loopback, never banned"),
    (b"ban 0.0.0.0 60", "ERR address: 0.0.0.0 is unspecified, never banned"),
    (b"ban 224.0.0.1 60", "ERR address: 224.0.0.1 is multicast, never banned"),
    (b"ban 203.0.113.5 60",
     "ERR never-ban: 203.0.113.5 is in the never-ban network 203.0.113.0/24"),
    (b"ban 198.51.100.5 60",
     "ERR never-ban: 198.51.100.5 is in the never-ban network 198.51.100.0/24"),
    (b"ban 192.0.2.1 99999999999", "ERR seconds: 99999999999 is outside 1..86400"),
    (b"ban 192.0.2.1 0", "ERR seconds: 0 is outside 1..86400"),
    (b"ban 192.0.2.1 -5", "ERR seconds: '-5' is not a whole number of seconds"),
    (b"ban 192.0.2.1 1e3", "ERR seconds: '1e3' is not a whole number of seconds"),
    (b"ban 192.0.2.1", "ERR syntax: expected 'ban ADDRESS SECONDS'"),
    (b"unban 192.0.2.1 60", "ERR syntax: expected 'unban ADDRESS'"),
    (b"unban 127.0.0.1", "ERR address: 127.0.0.1 is loopback, never banned"),
    (b"list all", "ERR syntax: expected 'list'"),
    (b"flush", "ERR syntax: expected 'ban ADDRESS SECONDS', 'unban ADDRESS' or 'list'"),
    (b"\x00\xff garbage", "ERR syntax: requests are ASCII: ban ADDRESS SECONDS"),
])
def test_invalid_requests_are_refused_with_a_clear_status(start_helper, request_line, status):
    helper = start_helper()
    # The same connection still serves a valid request afterwards.
    assert helper.ask(request_line, b"ban 192.0.2.3 60") == [
        status, "OK banned 192.0.2.3 for 60s"]
    assert helper.elements("portcullis_ban4") == {"192.0.2.3": 60}
    assert helper.elements("portcullis_ban6") == {}


@in_namespace
def test_the_appliances_own_infrastructure_is_never_banned(start_helper):
    helper = start_helper(
        "dns: {nameservers: ['10.0.0.53:53']}\n"
        "recipients: {source: ldap, ldap: {url: 'ldap://10.0.0.30:389', base: 'dc=example'}}\n",
        own_address="192.0.2.77/32", backend="10.0.0.25:25")
    assert helper.ask(b"ban 10.0.0.25 60", b"ban 10.0.0.30 60", b"ban 10.0.0.53 60",
                      b"ban 192.0.2.77 60", b"ban 192.0.2.78 60") == [
        "ERR never-ban: 10.0.0.25 is a backend server, never banned",
        "ERR never-ban: 10.0.0.30 is an LDAP server, never banned",
        "ERR never-ban: 10.0.0.53 is a DNS server, never banned",
        "ERR never-ban: 192.0.2.77 is an address of this appliance, never banned",
        "OK banned 192.0.2.78 for 60s"]
    assert helper.elements("portcullis_ban4") == {"192.0.2.78": 60}


@in_namespace
def test_an_overlong_line_is_refused_and_the_connection_closed(start_helper):
    helper = start_helper()
    with helper.connect() as client:
        client.sendall(b"ban " + b"1" * 4000 + b" 60\n")
        answer = client.makefile("rb").read()
    assert answer == b"ERR too-long: requests are at most 128 bytes\n"
    assert helper.ask(b"ban 192.0.2.4 60") == ["OK banned 192.0.2.4 for 60s"]
    assert helper.process.poll() is None


@in_namespace
def test_bans_beyond_the_burst_are_rate_limited(start_helper):
    helper = start_helper("  rate: 0.001\n  burst: 3\n")
    answers = helper.ask(*(f"ban 192.0.2.{n} 60".encode() for n in range(1, 6)))
    assert answers[:3] == [f"OK banned 192.0.2.{n} for 60s" for n in range(1, 4)]
    assert answers[3:] == ["ERR rate-limited: more than 0.001 bans per second (burst 3)"] * 2
    assert set(helper.elements("portcullis_ban4")) == {"192.0.2.1", "192.0.2.2", "192.0.2.3"}


@in_namespace
def test_refused_requests_do_not_use_up_the_rate(start_helper):
    helper = start_helper("  rate: 0.001\n  burst: 1\n")
    assert helper.ask(b"ban 127.0.0.1 60", b"ban 192.0.2.1 60")[1].startswith("OK")


@in_namespace
def test_a_missing_set_is_reported_per_request(start_helper):
    helper = start_helper("  set_ipv6: no_such_set\n")
    (answer,) = helper.ask(b"ban 2001:db8::1 60")
    assert answer.startswith("ERR nft: ")
    assert "No such file or directory" in answer


@in_namespace
def test_unban_takes_an_address_out_of_its_set_present_or_not(start_helper):
    helper = start_helper()
    helper.ask(b"ban 192.0.2.1 3600", b"ban 192.0.2.2 3600", b"ban 2001:db8::7 600")
    assert helper.ask(b"unban 192.0.2.1", b"unban 192.0.2.1", b"unban ::ffff:192.0.2.9",
                      b"unban 2001:db8::7", b"unban 203.0.113.5") == [
        "OK unbanned 192.0.2.1", "OK unbanned 192.0.2.1", "OK unbanned 192.0.2.9",
        "OK unbanned 2001:db8::7", "OK unbanned 203.0.113.5"]  # lifting never cuts anyone off
    assert helper.elements("portcullis_ban4") == {"192.0.2.2": 3600}
    assert helper.elements("portcullis_ban6") == {}


@in_namespace
def test_the_client_lists_and_unbans_through_the_helper(start_helper):
    helper = start_helper("  rate: 0.001\n  burst: 2\n")
    client = BanClient(helper.socket_path, timeout=5)
    assert asyncio.run(client.elements()) == {}
    assert asyncio.run(client.ban("192.0.2.8", 300)) is True
    helper.namespace.run(["nft", "add", "element", "inet", "portcullis", "portcullis_ban6",
                          "{ 2001:db8::8 }"])  # an element without timeout
    elements = asyncio.run(client.elements())
    assert elements.keys() == {"192.0.2.8", "2001:db8::8"}
    assert 290 <= elements["192.0.2.8"] <= 300 and elements["2001:db8::8"] is None
    assert asyncio.run(client.unban("192.0.2.8")) == "OK unbanned 192.0.2.8"
    with pytest.raises(BanHelperError, match="^the ban helper refused: rate-limited: "):
        asyncio.run(client.unban("2001:db8::8"))  # bans and unbans share the rate
    assert asyncio.run(client.elements()) == {"2001:db8::8": None}  # a listing is not limited


@in_namespace
def test_the_client_bans_through_the_helper(start_helper):
    helper = start_helper()
    client = BanClient(helper.socket_path, timeout=5)
    assert asyncio.run(client.ban("192.0.2.8", 300)) is True
    assert asyncio.run(client.ban("127.0.0.1", 300)) is False
    assert (client.sent, client.failed) == (1, 1)
    assert helper.elements("portcullis_ban4") == {"192.0.2.8": 300}


@in_namespace
def test_fire_and_forget_requests_complete_on_the_loop(start_helper):
    helper = start_helper()
    client = BanClient(helper.socket_path, timeout=5)

    async def gate():
        client.request_ban("192.0.2.20", 60)
        client.request_ban("2001:db8::20", 60)
        await client.close()

    asyncio.run(gate())
    assert client.sent == 2
    assert helper.elements("portcullis_ban4") == {"192.0.2.20": 60}
    assert helper.elements("portcullis_ban6") == {"2001:db8::20": 60}


def test_the_client_survives_a_missing_helper(tmp_path):
    client = BanClient(str(tmp_path / "nobody.sock"), timeout=1)
    assert asyncio.run(client.ban("192.0.2.1", 60)) is False
    assert client.failed == 1


def test_the_client_gives_up_on_a_silent_helper(tmp_path):
    path = str(tmp_path / "silent.sock")
    client = BanClient(path, timeout=0.3)

    async def silent_server_and_ban():
        server = await asyncio.start_unix_server(lambda r, w: asyncio.sleep(5), path)
        async with server:
            started = time.monotonic()
            result = await client.ban("192.0.2.1", 60)
            return result, time.monotonic() - started

    result, waited = asyncio.run(silent_server_and_ban())
    assert result is False
    assert client.failed == 1
    assert waited < 3  # bounded by the client's timeout, not the server's silence


def test_a_config_without_a_socket_fails_clearly(tmp_path, capsys):
    from portcullis import banhelper

    config_path = tmp_path / "portcullis.yaml"
    config_path.write_text("relay_domains: [example.test]\n"
                           "backend: {servers: ['127.0.0.1:2525']}\n")
    assert banhelper.main(["--config", str(config_path)]) == 2
    assert "key 'ban_socket': set the path" in capsys.readouterr().err


def test_a_bad_set_name_fails_clearly(tmp_path, capsys):
    from portcullis import banhelper

    config_path = tmp_path / "portcullis.yaml"
    config_path.write_text("relay_domains: [example.test]\n"
                           "backend: {servers: ['127.0.0.1:2525']}\n"
                           f"ban_socket: {tmp_path}/ban.sock\n"
                           "ban_helper: {set_ipv4: 'x; flush ruleset'}\n")
    assert banhelper.main(["--config", str(config_path)]) == 2
    assert "key 'ban_helper.set_ipv4': 'x; flush ruleset' is not an nftables name" in (
        capsys.readouterr().err)


