"""The ban helper: the only Portcullis process with CAP_NET_ADMIN (the spamd model).

It listens on the Unix socket `ban_socket` and accepts three requests, one per line of
at most MAX_LINE bytes, and answers each with one status line:

    ban ADDRESS SECONDS     OK banned 192.0.2.1 for 3600s
    unban ADDRESS           OK unbanned 192.0.2.1       (also when it was not in the set)
    list                    OK listing 2, then one line per element of both sets,
                            "ADDRESS SECONDS-LEFT" ("-" for an element without timeout)
    (any refusal)           ERR <reason>: <detail>     reason: syntax, too-long, address,
                            never-ban, seconds, rate-limited, nft, busy

A ban is refused unless ADDRESS is a plain IPv4 or IPv6 address that is not
loopback, unspecified or multicast, not in `allowlist` or `ban_helper.never_ban`, and
not part of the appliance's own infrastructure, which is derived rather than
configured: the backend servers, the LDAP and DNS servers, and every address of this
host (a ban there would cut off the backend's replies or the admin's SSH); and SECONDS
is an integer within ban_helper.min_seconds..max_seconds. An unban's ADDRESS is checked
the same way, except for the never-ban rules (lifting a ban cuts nobody off). Bans and
unbans pass a token bucket (ban_helper.rate per second, burst ban_helper.burst). The
address goes into (or out of) the set `ban_helper.set_ipv4` or `set_ipv6` of table
`inet ban_helper.table` through `nft -f -`, as a statement built from the parsed address
and integer: no shell, no unvalidated text.

Run as `portcullis ban-helper [--config PATH]` or `python -m portcullis.banhelper`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import grp
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

from . import config as config_module
from .addresses import TokenBucket
from .config import ConfigError

log = logging.getLogger("portcullis.banhelper")

MAX_LINE = 128  # bytes per request, newline included
MAX_CLIENTS = 16  # connections served at once; more get "ERR busy"
READ_TIMEOUT = 5.0  # seconds a connection may stay silent
NFT_TIMEOUT = 10.0  # seconds one nft (or ip) run may take
SOCKET_MODE = 0o660
ADDRESS_CHARS = re.compile(r"[0-9A-Fa-f.:]{2,45}")
SECONDS_CHARS = re.compile(r"[0-9]{1,12}")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
SYNTAX = {"ban": "ban ADDRESS SECONDS", "unban": "unban ADDRESS", "list": "list"}


class Refusal(Exception):
    """A request the helper will not carry out; str() is the status line."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"ERR {reason}: {detail}")


def infrastructure(config: config_module.Config) -> dict[IPAddress, str]:
    """The servers the appliance depends on, by address, each with what it is."""
    servers: list[tuple[str, str]] = [(s.host, "a backend server") for s in config.backend.servers]
    if config.recipients.source == "ldap":
        host = urllib.parse.urlsplit(config.recipients.ldap.url).hostname
        if host:
            servers.append((host, "an LDAP server"))
    resolvers = [s.host for s in config.dns.nameservers] or _system_resolvers()
    servers += [(host, "a DNS server") for host in resolvers]
    found: dict[IPAddress, str] = {}
    for host, what in servers:
        for address in _addresses_of(host):
            found.setdefault(address, what)
    return found


def _addresses_of(host: str) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as e:
        log.warning("cannot resolve %s to protect it from bans: %s", host, e)
        return []
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


def _system_resolvers(path: str = "/etc/resolv.conf") -> list[str]:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return [words[1] for words in map(str.split, f)
                    if len(words) >= 2 and words[0] == "nameserver"]
    except OSError:
        return []


def own_addresses() -> list[IPAddress]:
    """Every address configured on this host's interfaces (iproute2's `ip -j address`)."""
    ip = shutil.which("ip", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if ip is None:
        log.warning("no 'ip' command (Debian package iproute2): this host's own addresses "
                    "are not protected from bans")
        return []
    listing = subprocess.run([ip, "-j", "address", "show"], capture_output=True, text=True,
                             timeout=NFT_TIMEOUT, check=False)
    try:
        interfaces = json.loads(listing.stdout or "[]")
    except ValueError:
        return []
    return [ipaddress.ip_address(info["local"].split("%")[0])
            for interface in interfaces for info in interface.get("addr_info", ())
            if "local" in info]


@dataclass(frozen=True)
class Request:
    verb: str  # a key of SYNTAX
    address: IPAddress | None = None
    seconds: int = 0


class RequestPolicy:
    """Parses and validates one request line against the configuration."""

    def __init__(self, config: config_module.Config,
                 own: list[IPAddress] | None = None):
        settings = config.ban_helper
        self.never_ban = tuple(config.allowlist) + tuple(settings.never_ban)
        self.protected = infrastructure(config)
        for address in own_addresses() if own is None else own:
            self.protected.setdefault(address, "an address of this appliance")
        self.min_seconds = settings.min_seconds
        self.max_seconds = settings.max_seconds

    def parse(self, line: bytes) -> Request:
        """Return the request or raise Refusal."""
        try:
            text = line.decode("ascii").rstrip("\r\n")
        except UnicodeDecodeError:
            raise Refusal("syntax", "requests are ASCII: ban ADDRESS SECONDS") from None
        verb, *words = text.split(" ")
        if verb not in SYNTAX:
            raise Refusal("syntax", "expected 'ban ADDRESS SECONDS', 'unban ADDRESS' or 'list'")
        if len(words) != len(SYNTAX[verb].split()) - 1:
            raise Refusal("syntax", f"expected '{SYNTAX[verb]}'")
        if verb == "list":
            return Request(verb)
        if verb == "unban":
            return Request(verb, self._address(words[0], never_ban=False))
        return Request(verb, self._address(words[0]), self._seconds(words[1]))

    def _address(self, text: str, never_ban: bool = True) -> IPAddress:
        try:
            if not ADDRESS_CHARS.fullmatch(text):
                raise ValueError
            address = ipaddress.ip_address(text)
        except ValueError:
            raise Refusal("address", f"'{_printable(text)}' is not an IP address") from None
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        for kind in ("loopback", "unspecified", "multicast"):
            if getattr(address, f"is_{kind}"):
                raise Refusal("address", f"{address} is {kind}, never banned")
        if not never_ban:
            return address
        for network in self.never_ban:
            if address in network:
                raise Refusal("never-ban", f"{address} is in the never-ban network {network}")
        if address in self.protected:
            raise Refusal("never-ban", f"{address} is {self.protected[address]}, never banned")
        return address

    def _seconds(self, text: str) -> int:
        if not SECONDS_CHARS.fullmatch(text):
            raise Refusal("seconds", f"'{_printable(text)}' is not a whole number of seconds")
        seconds = int(text)
        if not self.min_seconds <= seconds <= self.max_seconds:
            raise Refusal("seconds",
                          f"{seconds} is outside {self.min_seconds}..{self.max_seconds}")
        return seconds


def _printable(text: str, limit: int = 48) -> str:
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def add_element_script(table: str, set_name: str, address: IPAddress, seconds: int) -> str:
    """nft statements that leave exactly one element with this timeout: an element that
    already exists keeps its old timeout on `add` in older kernels, so add (a no-op if
    present), delete, add again, in one atomic transaction."""
    element = f"inet {table} {set_name} {{ {address} timeout {seconds}s }}"
    return (f"add element {element}\n"
            f"delete element inet {table} {set_name} {{ {address} }}\n"
            f"add element {element}\n")


def delete_element_script(table: str, set_name: str, address: IPAddress) -> str:
    """nft statements that leave no element for address, whether or not there was one:
    add (a no-op if present), then delete, in one atomic transaction."""
    element = f"inet {table} {set_name} {{ {address} }}"
    return f"add element {element}\ndelete element {element}\n"


class BanHelper:
    """Table and set names are plain nft identifiers, checked at load (config.py)."""

    def __init__(self, config: config_module.Config, nft: str,
                 clock: Callable[[], float] = time.monotonic):
        settings = config.ban_helper
        self.settings = settings
        self.nft = nft
        self.policy = RequestPolicy(config)
        self.clock = clock
        self.bucket = TokenBucket(settings.rate, settings.burst, clock())
        self._clients = asyncio.Semaphore(MAX_CLIENTS)
        self._nft_lock = asyncio.Lock()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer each line of one connection until EOF, silence, or an overlong line."""
        if self._clients.locked():
            await _answer(writer, "ERR busy: too many connections")
            return
        async with self._clients:
            try:
                while True:
                    try:
                        async with asyncio.timeout(READ_TIMEOUT):
                            line = await reader.readline()
                    except ValueError:  # longer than the stream's limit
                        await _answer(writer, f"ERR too-long: requests are at most "
                                              f"{MAX_LINE} bytes")
                        return
                    if not line.endswith(b"\n"):  # EOF, possibly after a partial line
                        return
                    await _answer(writer, await self.request(line), close=False)
            except (TimeoutError, ConnectionError):
                return
            finally:
                writer.close()

    async def request(self, line: bytes) -> str:
        """Carry out one request line; return its status line."""
        try:
            request = self.policy.parse(line)
        except Refusal as refusal:
            log.warning("refused %r: %s", line[:MAX_LINE], refusal)
            return str(refusal)
        if request.verb == "list":
            return await self._list()
        if not self.bucket.take(self.clock()):
            log.warning("refused %s of %s: rate limited", request.verb, request.address)
            return (f"ERR rate-limited: more than {self.settings.rate:g} bans per second "
                    f"(burst {self.settings.burst})")
        return await self._change(request)

    def _set_of(self, address: IPAddress) -> str:
        return self.settings.set_ipv4 if address.version == 4 else self.settings.set_ipv6

    async def _change(self, request: Request) -> str:
        """Carry out a ban or an unban."""
        address, table = request.address, self.settings.table
        if request.verb == "ban":
            script = add_element_script(table, self._set_of(address), address, request.seconds)
            done = f"banned {address} for {request.seconds}s"
        else:
            script = delete_element_script(table, self._set_of(address), address)
            done = f"unbanned {address}"
        async with self._nft_lock:
            _, problem = await _run_nft(self.nft, "-f", "-", script=script)
        if problem:
            log.error("nft could not %s %s: %s", request.verb, address, problem)
            return f"ERR nft: {problem}"
        log.info("%s", done)
        return f"OK {done}"

    async def _list(self) -> str:
        """Every element of both sets, with the seconds it has left."""
        elements = []
        for set_name in (self.settings.set_ipv4, self.settings.set_ipv6):
            async with self._nft_lock:
                listing, problem = await _run_nft(self.nft, "-j", "list", "set", "inet",
                                                  self.settings.table, set_name)
            if problem:
                return f"ERR nft: {problem}"
            try:
                items = json.loads(listing)["nftables"]
            except (ValueError, KeyError):
                return "ERR nft: cannot parse its listing"
            for item in items:
                for element in item.get("set", {}).get("elem", ()):
                    # A plain value, or {"elem": {"val": ..., "expires": ...}} with a timeout
                    element = element["elem"] if isinstance(element, dict) else {"val": element}
                    elements.append(f"{element['val']} {element.get('expires', '-')}")
        return "\n".join([f"OK listing {len(elements)}", *elements])


async def _answer(writer: asyncio.StreamWriter, status: str, close: bool = True) -> None:
    with contextlib.suppress(ConnectionError):
        writer.write(status.encode("ascii", "replace") + b"\n")
        await writer.drain()
    if close:
        writer.close()


async def _run_nft(nft: str, *args: str, script: str = "") -> tuple[str, str]:
    """Run nft with args (and script on stdin); return its output and '' or the first
    line of its error."""
    process = await asyncio.create_subprocess_exec(
        nft, *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        async with asyncio.timeout(NFT_TIMEOUT):
            stdout, stderr = await process.communicate(script.encode("ascii"))
    except TimeoutError:
        process.kill()
        await process.wait()
        return "", f"nft took longer than {NFT_TIMEOUT}s"
    if process.returncode != 0:
        lines = stderr.decode("utf-8", "replace").strip().splitlines()
        return "", lines[0] if lines else f"nft exited {process.returncode}"
    return stdout.decode("ascii", "replace"), ""


def _check_sets(nft: str, settings: config_module.BanHelper) -> None:
    """Warn at start when the ruleset lacks the sets (it may be loaded later)."""
    for set_name in (settings.set_ipv4, settings.set_ipv6):
        result = subprocess.run([nft, "list", "set", "inet", settings.table, set_name],
                                check=False, capture_output=True, text=True, timeout=NFT_TIMEOUT)
        if result.returncode != 0:
            log.warning("set inet %s %s is missing (load the Portcullis nftables ruleset); "
                        "bans will fail until it exists", settings.table, set_name)


def _remove_stale_socket(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):  # anything else: config.check_ban_helper
            os.unlink(path)


async def serve(helper: BanHelper, path: str, group_id: int | None) -> None:
    """Listen on path until SIGTERM or SIGINT."""
    _remove_stale_socket(path)
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    server = await asyncio.start_unix_server(helper.handle, path, limit=MAX_LINE)
    try:
        os.chmod(path, SOCKET_MODE)
        # Under systemd the socket is born with the right group (Group=), and the
        # sandbox forbids chown: only change what is not already so.
        if group_id is not None and os.stat(path).st_gid != group_id:
            os.chown(path, -1, group_id)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        log.info("listening on %s", path)
        await stop.wait()
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="portcullis ban-helper",
        description="Add banned addresses to the nftables ban sets on request.")
    parser.add_argument("--config", default=config_module.DEFAULT_PATH,
                        help=f"configuration file (default {config_module.DEFAULT_PATH})")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        from .logs import setup
        setup("info", "ban-helper")  # JSON lines, like the gate's
    try:
        config = config_module.check_ban_helper(config_module.load(args.config, io_checks=False))
        nft = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
        if nft is None:
            raise ConfigError("nft not found: install the nftables package")
        helper = BanHelper(config, nft)
        group = config.ban_helper.socket_group
        group_id = grp.getgrnam(group).gr_gid if group else None
        _check_sets(nft, config.ban_helper)
        asyncio.run(serve(helper, config.ban_socket, group_id))
    except ConfigError as e:
        print(f"portcullis ban-helper: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"portcullis ban-helper: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
