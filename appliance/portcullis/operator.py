"""The operator's commands, in the manner of postconf and postqueue: `portcullis bans
list|add|remove`, `show-config [-n]` and `status`; and the status file the gate writes
for them.

They work on a running appliance from outside, through the state directory and the ban
helper. The gate writes STATUS_FILE into state_dir every second (atomically, by rename);
a file older than STALE_AFTER, or whose process is gone, means the gate is not running.
A ban goes to the reputation store, which every gate process reads every
reputation.sync_interval, and to the kernel set through the ban helper, which alone
decides what may be banned (allowlist, never_ban, the appliance's own servers). Each
failure is an OperatorError: one line, exit status 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import fields, is_dataclass

import yaml

from . import upstream
from .addresses import canonical, client_of, prefix_of_text
from .config import Backend, Config, ConfigError, DnsListSite, HostPort
from .firewall import BanClient, BanHelperError
from .policy import fleet, reputation

log = logging.getLogger("portcullis.operator")

STATUS_FILE = "status.json"  # in state_dir
STALE_AFTER = 5.0  # seconds without an update after which the gate counts as stopped
HELPER_TIMEOUT = 15.0  # the helper may take its NFT_TIMEOUT (10 s) per request
PROBE_TIMEOUT = 3.0  # the most a backend probe waits, to connect and for the banner
MOUNTINFO = "/proc/self/mountinfo"
MEMORY_FILESYSTEMS = ("tmpfs", "ramfs")  # what is on them is gone at reboot
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")  # mountinfo's \040 for a space, and the like
SYNC_MARGIN = 0.5  # seconds beyond sync_interval until every gate process saw a change
ADMIN_BAN = "ADMIN_BAN"  # the label of a ban added by `bans add`


class OperatorError(Exception):
    """Why a command cannot do its work, phrased for the administrator."""


def run(command, config: Config, *arguments) -> int:
    """Print what command(config, *arguments) returns, exit status 0; or its error, one
    line on stderr, exit status 1."""
    logging.getLogger("portcullis").addHandler(logging.NullHandler())  # the error says it
    try:
        print(command(config, *arguments))
    except OperatorError as e:
        print(f"portcullis: {e}", file=sys.stderr)
        return 1
    return 0


# --- the gate's side: the status file --------------------------------------------------

class StatusWriter:
    """Writes the gate's runtime facts to state_dir/STATUS_FILE; the gate calls write()
    every second. A failure is logged once, until a write works again."""

    def __init__(self) -> None:
        self.failing = False

    def write(self, gate) -> None:
        status = {
            "pid": os.getpid(), "time": time.time(), "config": gate.config_path,
            "listeners": [listener.address for listener in gate.listeners],
            "workers": [{"number": w.number, "pid": w.process.pid,
                         "alive": w.process.poll() is None, "active": w.active}
                        for w in gate.workers],
            "active_connections": gate.table.total,
            "awaiting_first_command": sum(c.silence is not None for c in gate.connections.values()),
            "stress": gate.table.stressed,
            "store_write_errors": getattr(gate.store, "write_errors", 0),
        }
        path = os.path.join(gate.config.state_dir, STATUS_FILE)
        try:
            os.makedirs(gate.config.state_dir, mode=0o750, exist_ok=True)
            with open(f"{path}.tmp", "w", encoding="utf-8") as f:
                json.dump(status, f)
            os.replace(f"{path}.tmp", path)
        except OSError as e:
            if not self.failing:
                log.warning("cannot write the status file %s: %s", path, e.strerror)
            self.failing = True
        else:
            self.failing = False


def gate_status(config: Config) -> dict:
    """The running gate's last status; OperatorError when it is not running."""
    path = os.path.join(config.state_dir, STATUS_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            status = json.load(f)
        pid, written = int(status["pid"]), float(status["time"])
    except FileNotFoundError:
        raise OperatorError(f"the gate is not running (no status file {path})") from None
    except OSError as e:
        raise OperatorError(f"cannot read the gate's status file {path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError):
        raise OperatorError(f"{path} is not a status file written by the gate") from None
    age = time.time() - written
    if not _process_exists(pid) or age > STALE_AFTER:
        raise OperatorError(f"the gate is not running (process {pid} last wrote "
                            f"{path} {age:.0f} s ago)")
    return status


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


# --- status ------------------------------------------------------------------------------

def status(config: Config) -> str:
    """What the running gate reports, plus what this command checks itself: each
    backend server (connect and banner) and the reputation store (open and read)."""
    facts = gate_status(config)
    workers = facts["workers"]
    lines = [f"gate: running, pid {facts['pid']}, configuration {facts['config']}",
             f"listeners: {', '.join(facts['listeners'])}",
             f"workers: {sum(w['alive'] for w in workers)} of {len(workers)} alive"]
    lines += [f"  worker {w['number']}: pid {w['pid']}, {'alive' if w['alive'] else 'dead'}, "
              f"{w['active']} active connections" for w in workers]
    lines += [f"active connections: {facts['active_connections']}",
              f"  greeted, awaiting a first command: {facts.get('awaiting_first_command', 0)}",
              f"stress mode: {'on' if facts['stress'] else 'off'}"]
    timeout = min(config.backend.connect_timeout, PROBE_TIMEOUT)
    lines += [f"backend {server}: {probe_backend(server, config.backend, timeout)}"
              for server in config.backend.servers]
    lines.append(f"store: {_store_health(config)}; write errors: {facts['store_write_errors']}")
    lines.append(f"state: {state_storage(config.state_dir)}")
    return "\n".join(lines)


def state_storage(path: str, mountinfo: str = MOUNTINFO) -> str:
    """Where the state directory lives: the device and filesystem of the mount that
    holds it, or that it is in memory, so bans and reputation are lost at reboot (an
    appliance booted without its data disk)."""
    target = os.path.realpath(path)
    found = None
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                mount = _mount(line)
                # The deepest mount point wins; of two on the same point, the later.
                if mount and _holds(mount[0], target) and (
                        found is None or len(mount[0]) >= len(found[0])):
                    found = mount
    except OSError as e:
        return f"{path} (cannot read {mountinfo}: {e.strerror})"
    if found is None:
        return f"{path} (on no mount listed in {mountinfo})"
    _, fstype, source = found
    if fstype in MEMORY_FILESYSTEMS:
        return f"{path} on {fstype}: bans, reputation and the TLS pair are lost at reboot"
    return f"{path} on {source} ({fstype})"


def _mount(line: str) -> tuple[str, str, str] | None:
    """(mount point, filesystem type, source) of a mountinfo line (proc(5)); octal
    escapes such as \\040 for a space undone."""
    before, separator, after = line.partition(" - ")
    head, tail = before.split(), after.split()
    if not separator or len(head) < 5 or len(tail) < 2:
        return None
    return _unescape(head[4]), tail[0], _unescape(tail[1])


def _unescape(text: str) -> str:
    return _OCTAL_ESCAPE.sub(lambda match: chr(int(match[1], 8)), text)


def _holds(mount_point: str, path: str) -> bool:
    return path == mount_point or path.startswith(mount_point.rstrip("/") + "/")


def probe_backend(server: HostPort, backend: Backend, timeout: float) -> str:
    """'reachable (banner)' when the server answers 220 within timeout, else why not."""
    answered, detail = asyncio.run(upstream.greeting(server, backend, timeout))
    return f"{'reachable' if answered else 'unreachable'} ({detail})"


def _store_health(config: Config) -> str:
    if config.reputation.store == "memory":
        return "memory (each process its own; nothing to check)"
    try:
        bans = _active_bans(config, time.time())
    except (ConfigError, OperatorError) as e:
        return f"{config.reputation.store}, {e}"
    if config.reputation.store == "redis":
        return f"redis {fleet.where(config.reputation.redis.url)}: reachable, " \
               f"{len(bans)} active bans in the fleet"
    return f"sqlite {_store_path(config)}: readable, {len(bans)} active bans"


def _active_bans(config: Config, now: float) -> list[reputation.Ban]:
    """The bans in force, soonest to end first: the appliance's (SQLite), or with the
    fleet's store, the fleet's."""
    if config.reputation.store != "redis":
        return reputation.read_bans(_store_path(config), now)
    with _store(config) as store:
        bans = store.active_bans(now)
    return sorted(bans, key=lambda ban: ban.until)


# --- bans --------------------------------------------------------------------------------

def bans_list(config: Config) -> str:
    """The store's bans in force, each marked whether the kernel set holds it (or an
    address inside it); then the set's elements that no ban in the store covers."""
    gate_status(config)
    now = time.time()
    try:
        bans = _active_bans(config, now)
    except ConfigError as e:
        raise OperatorError(str(e)) from None
    kernel = _ask(_helper(config).elements())
    row = "{:<42} {:<12} {:<20} {:>9}  {}".format
    lines = [row("ADDRESS/PREFIX", "LABEL", "EXPIRES (UTC)", "LEFT", "IN KERNEL SET")]
    covered = set()
    for ban in bans:
        inside = _inside(kernel, ipaddress.ip_network(ban.key))
        covered.update(inside)
        lines.append(row(ban.key, ban.label, _utc(ban.until), f"{ban.until - now:.0f}s",
                         "yes" if inside else "no"))
    for address, left in kernel.items():
        if address not in covered:
            lines.append(row(address, "-", "-" if left is None else _utc(now + left),
                             "-" if left is None else f"{left}s", "yes, not in the store"))
    return "\n".join(lines) if len(lines) > 1 else "no bans"


def bans_add(config: Config, text: str, seconds: int | None) -> str:
    """Ban an address in the kernel set (the helper refuses what must never be banned)
    and in the store, where every gate process finds it within sync_interval. An
    existing longer ban is kept."""
    gate_status(config)
    try:
        address = str(canonical(text))
    except ValueError:
        raise OperatorError(f"'{text}' is not an IP address") from None
    key = client_of(address, config.limits.ipv6_client_prefix)  # an IPv6 client is its /64
    helper = _helper(config)
    with _store(config) as store:
        now = time.time()
        seconds = int(config.reputation.ban_ttl) if seconds is None else seconds
        current = store.ban_of(key, now)
        if current is not None:
            seconds = max(seconds, math.ceil(current.until - now))
        _ask(helper.ask(f"ban {address} {seconds}"))
        store.ban(key, now + seconds, ADMIN_BAN)
    return (f"banned {key} until {_utc(now + seconds)} UTC ({seconds} s), in the store and "
            "the kernel set")


def bans_remove(config: Config, text: str) -> str:
    """Lift every ban inside an address's client (an IPv6 address stands for its /64) or
    inside a prefix: in the store, then in the kernel set."""
    gate_status(config)
    try:
        address = str(canonical(text))
        network = ipaddress.ip_network(client_of(address, config.limits.ipv6_client_prefix))
    except ValueError:
        try:
            address, network = None, ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise OperatorError(f"'{text}' is not an IP address or network") from None
    helper = _helper(config)
    in_kernel = _inside(_ask(helper.elements()), network)
    with _store(config) as store:
        now = time.time()
        lifted = [ban.key for ban in store.active_bans(now) if _inside([ban.key], network)]
        if not lifted and not in_kernel:
            raise OperatorError(f"{network.compressed if address is None else text} "
                                "is not banned")
        for key in lifted:
            store.unban(key)
        prefix = address and prefix_of_text(address, config.limits.ipv4_prefix,
                                            config.limits.ipv6_prefix)
        prefix_ban = prefix and store.ban_of(prefix, now)
    # Until every gate process has read the removal, one may still refuse the client and
    # send its ban to the kernel again: clear the set after that.
    time.sleep(config.reputation.sync_interval + SYNC_MARGIN)
    in_kernel = _inside(_ask(helper.elements()), network)
    for element in in_kernel:
        _ask(helper.unban(element))
    lines = [f"lifted in the store: {', '.join(lifted) or 'none'}",
             f"taken out of the kernel set: {', '.join(in_kernel) or 'none'}"]
    if prefix_ban:
        lines.append(f"note: its prefix {prefix} stays banned until "
                     f"{_utc(prefix_ban.until)} UTC")
    return "\n".join(lines)


def _inside(keys, network) -> list[str]:
    """The addresses or networks among keys that lie inside network."""
    inside = []
    for key in keys:
        inner = ipaddress.ip_network(key)
        if inner.version == network.version and inner.subnet_of(network):
            inside.append(key)
    return inside


def _store_path(config: Config) -> str:
    if config.reputation.store == "memory":
        raise OperatorError("reputation.store is memory: each gate process keeps its bans "
                            "to itself; use sqlite to manage them from here")
    return os.path.join(config.state_dir, reputation.DATABASE_NAME)


@contextlib.contextmanager
def _store(config: Config):
    """The gate's store, opened for writing; what was written is committed at the end."""
    path = _store_path(config)
    try:
        store = reputation.open_store(config)
    except ConfigError as e:
        raise OperatorError(str(e)) from None
    try:
        if config.reputation.store == "redis":  # and the fleet's, through its server
            with fleet.connected(store):
                yield store
        else:
            yield store
    except ConfigError as e:
        raise OperatorError(str(e)) from None
    finally:
        store.close()
    if store.write_errors:
        raise OperatorError(f"could not write to the reputation store {path}")


def _helper(config: Config) -> BanClient:
    if not config.ban_socket:
        raise OperatorError("ban_socket is not set: there is no ban helper to ask")
    return BanClient(config.ban_socket, timeout=HELPER_TIMEOUT)


def _ask(request):
    """Run one ban helper request to its end; OperatorError when it fails."""
    try:
        return asyncio.run(request)
    except BanHelperError as e:
        raise OperatorError(str(e)) from None


def _utc(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(when))


# --- show-config -------------------------------------------------------------------------

def show_config(config: Config, changed_only: bool = False) -> str:
    """The effective configuration as YAML, every key with defaults filled in; or, like
    `postconf -n`, only the keys the file sets to something else than the default. The
    configuration holds file paths, never secrets: a password is in the file it names."""
    values = _plain(config)
    if changed_only:
        values = _changed(values, _plain(Config()), config.lines)
    return yaml.safe_dump(values, sort_keys=False, allow_unicode=True)


def _plain(value):
    """A configuration value as plain YAML data, each value written as the file writes it."""
    if isinstance(value, DnsListSite):
        return _site_text(value)
    if isinstance(value, HostPort | ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value) if f.init}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _changed(values: dict, defaults: dict, lines: dict[str, int], prefix: str = "") -> dict:
    """The keys the file sets (config.lines) whose value is not the default."""
    changed = {}
    for key, value in values.items():
        dotted = prefix + key
        if isinstance(value, dict):
            value = _changed(value, defaults[key], lines, dotted + ".")
            if value:
                changed[key] = value
        elif dotted in lines and value != defaults[key]:
            changed[key] = value
    return changed


def _site_text(site: DnsListSite) -> str:
    """A DNS list site in postscreen's syntax, as written in dns.dnsbl.sites."""
    text = site.zone
    if site.octets is not None:
        text += "=" + ".".join(
            str(ranges[0][0]) if len(ranges) == 1 and ranges[0][0] == ranges[0][1] else
            "[" + ";".join(f"{low}" if low == high else f"{low}..{high}"
                           for low, high in ranges) + "]"
            for ranges in site.octets)
    return text if site.weight == 1 else f"{text}*{site.weight}"
