"""Private Postfix instances for tests and benchmarks, never the system one.

PostfixInstance runs a Postfix with its own config, queue and data directories in a
temporary directory, and passes `-c DIR` to every postconf/postmap/postfix call.
PostfixBackend builds on it: a backend mail server that delivers a test domain into
Maildirs, rejects unknown users with 550, and switches to tempfail modes on demand.
Blackhole is a listener that accepts connections and never answers.
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from tests.support.tools import free_port, port_accepts, wait_until

# Internal services every instance needs. chroot is off everywhere ("n"), so nothing
# has to be copied into the queue directory.
_BASE_SERVICES = """\
pickup     unix  n - n 60   1 pickup
cleanup    unix  n - n -    0 cleanup
qmgr       unix  n - n 300  1 qmgr
rewrite    unix  - - n -    - trivial-rewrite
bounce     unix  - - n -    0 bounce
defer      unix  - - n -    0 bounce
trace      unix  - - n -    0 bounce
verify     unix  - - n -    1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -    - proxymap
proxywrite unix  - - n -    1 proxymap
showq      unix  n - n -    - showq
error      unix  - - n -    - error
retry      unix  - - n -    - error
discard    unix  - - n -    - discard
virtual    unix  - n n -    - virtual
anvil      unix  - - n -    1 anvil
scache     unix  - - n -    1 scache
postlog    unix-dgram n - n - 1 postlogd
"""

POSTFIX_USER = "postfix"


def _require_postfix() -> None:
    if shutil.which("postfix", path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", "")) is None:
        raise RuntimeError("postfix is not installed: apt-get install postfix "
                           "(listed in deps/apt-test.txt; run scripts/install-deps test)")
    if os.geteuid() != 0:
        raise RuntimeError("a private Postfix instance must be started as root")


class PostfixInstance:
    """One private Postfix: main.cf from `settings`, master.cf from `services`.

    `services` are extra master.cf lines (the listeners). Use as a context manager, or
    call start() and close(); close() also runs at interpreter exit as a safety net.
    """

    def __init__(self, settings: dict[str, str], services: str, name: str = "postfix",
                 run_in: Sequence[str] = ()):
        """run_in: a command prefix for the daemons, e.g. `ip netns exec NS` (netns.prefix)."""
        _require_postfix()
        self.run_in = list(run_in)
        self.root = Path(tempfile.mkdtemp(prefix=f"portcullis-{name}-"))
        self.running = False
        self._closed = False
        atexit.register(self.close)  # a crashed run must leave no Postfix and no directory
        self.root.chmod(0o755)  # Postfix daemons run as the postfix user and must enter it
        self.config_dir = self.root / "etc"
        self.queue_dir = self.root / "queue"
        self.data_dir = self.root / "data"
        self.log_file = self.root / "maillog"
        postfix_user = pwd.getpwnam(POSTFIX_USER)
        for directory in (self.config_dir, self.queue_dir, self.data_dir):
            directory.mkdir(mode=0o755)
        os.chown(self.data_dir, postfix_user.pw_uid, postfix_user.pw_gid)
        (self.config_dir / "master.cf").write_text(_BASE_SERVICES + services)
        (self.config_dir / "main.cf").write_text("")
        self.postconf({
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "maillog_file": str(self.log_file),
            "maillog_file_prefixes": f"/var, {self.root}",
            "syslog_name": f"portcullis-test/{name}",
            "myhostname": f"{name}.test",
            "mydestination": "",
            "inet_protocols": "ipv4",
            "smtpd_peername_lookup": "no",
            "biff": "no",
            "readme_directory": "no",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            # Nothing leaves the instance: mail for other domains stays in the queue.
            "default_transport": "retry:4.3.0 test instance sends no outbound mail",
            "relay_transport": "retry:4.3.0 test instance sends no outbound mail",
            **settings,
        })

    # --- commands -------------------------------------------------------------------

    def _run(self, *argv: str, check: bool = True) -> str:
        """Run a Postfix command; return its output (stdout and stderr)."""
        # A file, not a pipe: `postfix start|reload` leave background jobs holding the
        # command's output open, and reading a pipe to its end would wait for them.
        with tempfile.TemporaryFile(mode="w+") as output:
            result = subprocess.run(argv, stdout=output, stderr=subprocess.STDOUT,
                                    check=False, timeout=60)
            output.seek(0)
            text = output.read()
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {text.strip()}")
        return text

    def postconf(self, settings: dict[str, str]) -> None:
        """Set main.cf parameters (postconf -e); running daemons see them after reload()."""
        if settings:
            self._run("postconf", "-c", str(self.config_dir), "-e",
                      *(f"{key}={value}" for key, value in settings.items()))
            # postfix(1) start/reload pause about 2 s while main.cf is that young.
            aged = time.time() - 10
            os.utime(self.config_dir / "main.cf", (aged, aged))

    def postmap(self, name: str, entries: dict[str, str]) -> str:
        """Write a hash table in the config directory; return its "hash:PATH" name."""
        path = self.config_dir / name
        path.write_text("".join(f"{key} {value}\n" for key, value in entries.items()))
        self._run("postmap", "-c", str(self.config_dir), f"hash:{path}")
        return f"hash:{path}"

    def postfix(self, command: str, check: bool = True) -> str:
        return self._run(*self.run_in, "postfix", "-c", str(self.config_dir), command, check=check)

    # --- lifecycle ------------------------------------------------------------------

    def master_pid(self) -> int | None:
        """The master's pid if it is alive."""
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
            os.kill(pid, 0)
        except (FileNotFoundError, IndexError, ValueError, ProcessLookupError):
            return None
        return pid

    def start(self) -> None:
        if self.running:
            return
        self.postfix("start")
        self.running = True
        wait_until(self.ready, 20, f"Postfix in {self.config_dir} to accept connections")

    def ready(self) -> bool:
        """True once the instance serves its listeners; subclasses refine it."""
        return self.master_pid() is not None

    def stop(self) -> None:
        """Stop the instance and wait until its master has exited."""
        if not self.running:
            return
        pid = self.master_pid()
        self.postfix("stop", check=False)
        if pid is not None:
            try:
                wait_until(lambda: not _alive(pid), 15, "the Postfix master to exit")
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
        self.running = False

    def reload(self) -> None:
        """Re-read main.cf; wait until no smtpd of the old configuration can take a client."""
        before = self.children("smtpd")
        self.postfix("reload")
        wait_until(lambda: not (before & self.children("smtpd")), 15,
                   "smtpd processes with the old configuration to exit")

    def children(self, program: str) -> set[int]:
        """Pids of the master's child daemons running `program` (smtpd, postscreen...)."""
        master = self.master_pid()
        if master is None:
            return set()
        pids = set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                command, fields = stat.read_text().rsplit(")", 1)
            except OSError:
                continue
            # fields[1] is the parent pid; command is "pid (comm"
            if int(fields.split()[1]) == master and command.endswith(f"({program}"):
                pids.add(int(stat.parent.name))
        return pids

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.stop()
        finally:
            self._closed = True
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- queue and log ----------------------------------------------------------------

    def queued_ids(self, queues=("maildrop", "incoming", "active", "deferred", "hold",
                                 "corrupt")) -> list[str]:
        """Queue ids of the messages in the given queues (by default, all of them)."""
        queued = []
        for subdir in queues:
            top = self.queue_dir / subdir
            if top.is_dir():
                queued += [path.name for path in top.rglob("*") if path.is_file()]
        return queued

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is as good as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --- the backend mail server -------------------------------------------------------

# Backend modes: the restrictions each one sets. set_mode() empties all of _MODE_KEYS
# first, so any mode can follow any other in one postconf call.
MODES: dict[str, dict[str, str]] = {
    "normal": {},
    "tempfail_rcpt": {"smtpd_recipient_restrictions": "defer"},
    "tempfail_data": {"smtpd_data_restrictions": "defer"},
    "tempfail_end_of_data": {"smtpd_end_of_data_restrictions": "defer"},
}
_MODE_KEYS = ("smtpd_recipient_restrictions", "smtpd_data_restrictions",
              "smtpd_end_of_data_restrictions")

# Headers Postfix puts on top of a delivered message (virtual(8) and smtpd).
_PREPENDED = (b"return-path:", b"delivered-to:", b"x-original-to:")


class PostfixBackend(PostfixInstance):
    """A backend mail server on host:port delivering `domain` into Maildirs.

    Listed users get their mail in a Maildir; unknown users are refused with 550.
    Clients from loopback may relay (mynetworks), as the gate does.

    Options, off by default: `xforward_hosts` and `xclient_hosts` (networks offered
    XFORWARD and XCLIENT, smtpd_authorized_*_hosts), and `client_access`, a cidr table
    of client networks and actions (check_client_access in smtpd_client_restrictions).
    """

    def __init__(self, host: str = "127.0.0.1", port: int | None = None,
                 domain: str = "example.test", users=("alice", "bob", "carol"),
                 run_in: Sequence[str] = (), xforward_hosts: str = "", xclient_hosts: str = "",
                 client_access: dict[str, str] | None = None):
        self.host, self.port = host, port or free_port(host)
        self.domain, self.users = domain, tuple(users)
        listen = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        super().__init__({}, f"{listen} inet n - n - - smtpd\n", name="backend", run_in=run_in)
        self.mailbox_base = self.root / "mailboxes"
        self.mailbox_base.mkdir()
        owner = pwd.getpwnam("nobody")
        os.chown(self.mailbox_base, owner.pw_uid, owner.pw_gid)
        mailbox_map = self.postmap("virtual_mailboxes", {
            address: f"{domain}/{address.split('@')[0]}/" for address in self.addresses})
        self.postconf({
            "inet_protocols": "ipv6" if ":" in host else "ipv4",
            "mynetworks": "127.0.0.0/8 [::1]/128",
            "smtpd_relay_restrictions": "permit_mynetworks reject_unauth_destination",
            "virtual_mailbox_domains": domain,
            "virtual_mailbox_base": str(self.mailbox_base),
            "virtual_mailbox_maps": mailbox_map,
            "virtual_uid_maps": f"static:{owner.pw_uid}",
            "virtual_gid_maps": f"static:{owner.pw_gid}",
            "virtual_minimum_uid": str(min(owner.pw_uid, 100)),
            # Deliver what the client sent: no Message-ID/Date/To added, no rewriting.
            "local_header_rewrite_clients": "",
            **dict.fromkeys(_MODE_KEYS, ""),
        })
        if xforward_hosts or xclient_hosts:
            self.postconf({"smtpd_authorized_xforward_hosts": xforward_hosts,
                           "smtpd_authorized_xclient_hosts": xclient_hosts})
        if client_access:
            table = self.config_dir / "client_access.cidr"
            table.write_text("".join(f"{net} {action}\n" for net, action in client_access.items()))
            self.postconf({"smtpd_client_restrictions": f"check_client_access cidr:{table}"})
        self.mode = "normal"

    @property
    def addresses(self) -> list[str]:
        return [f"{user}@{self.domain}" for user in self.users]

    def ready(self) -> bool:
        if not super().ready():
            return False
        if not self.run_in:
            return port_accepts(self.host, self.port)
        probe = f"import socket; socket.create_connection(({self.host!r}, {self.port}), 1)"
        return subprocess.run([*self.run_in, sys.executable, "-c", probe], check=False,
                              capture_output=True, timeout=10).returncode == 0

    def set_mode(self, mode: str) -> None:
        """Switch to one of MODES, effective for every connection opened afterwards."""
        if mode not in MODES:
            raise ValueError(f"unknown backend mode {mode!r}; known: {', '.join(MODES)}")
        if mode == self.mode:
            return
        self.postconf({**dict.fromkeys(_MODE_KEYS, ""), **MODES[mode]})
        self.mode = mode
        if self.running:
            self.reload()

    # --- mailboxes ------------------------------------------------------------------

    def _new_mail(self, user: str) -> list[Path]:
        mailbox = self.mailbox_base / self.domain / user / "new"
        files = [path for path in mailbox.iterdir()] if mailbox.is_dir() else []
        return sorted(files, key=lambda path: (path.stat().st_mtime_ns, path.name))

    def messages(self, user: str) -> list[bytes]:
        """Every message delivered to user (local part), oldest first, as stored."""
        if user not in self.users:
            raise ValueError(f"{user!r} is not a backend user ({', '.join(self.users)})")
        return [path.read_bytes() for path in self._new_mail(user)]

    def wait_for(self, user: str, count: int = 1, timeout: float = 10) -> list[bytes]:
        """Wait until user has at least `count` messages; return them all."""
        wait_until(lambda: len(self._new_mail(user)) >= count, timeout,
                   f"{count} message(s) for {user}@{self.domain}")
        return self.messages(user)

    def clear_mailboxes(self) -> None:
        for user in self.users:
            for path in self._new_mail(user):
                path.unlink()

    def bounces(self) -> list[bytes]:
        """Delivered bounces (null sender) in any mailbox."""
        return [message for user in self.users for message in self.messages(user)
                if message.startswith(b"Return-Path: <>")]

    def assert_no_bounce(self, settle: float = 5) -> None:
        """Fail if a bounce was delivered or anything (a bounce, a deferral) is queued.

        Waits up to `settle` seconds for messages in transit (a bounce being generated,
        a refused transaction being removed) to leave the queue first.
        """
        try:
            wait_until(lambda: not self.queued_ids(("maildrop", "incoming", "active")), settle,
                       "the backend queue to settle")
        except TimeoutError:
            pass  # reported below with the queue listing
        queued, bounces = self.queued_ids(), self.bounces()
        assert not bounces, f"the backend delivered {len(bounces)} bounce(s): {bounces[0][:500]!r}"
        assert not queued, f"the backend queue holds {queued}; postqueue -p:\n{self.queue_listing()}"

    def queue_listing(self) -> str:
        return self._run("postqueue", "-c", str(self.config_dir), "-p", check=False)

    def flush_queue(self) -> None:
        """Delete everything left in the queue."""
        if self.queued_ids():
            self._run("postsuper", "-c", str(self.config_dir), "-d", "ALL", check=False)

    def reset(self) -> None:
        """Back to a running, normal, empty backend (between tests)."""
        self.start()
        self.set_mode("normal")
        self.flush_queue()
        self.clear_mailboxes()


def as_sent(delivered: bytes, backend_hostname: str = "backend.test") -> bytes:
    """The message as its client sent it: drop what Postfix put on top, restore CRLF.

    Removes the leading Return-Path, Delivered-To and X-Original-To headers, the one
    Received header the backend added ("by backend.test") and, right below it, the
    gate's ("(Portcullis)") when the message came through a gate; then turns LF into
    CRLF.
    """
    header_end = delivered.find(b"\n\n")
    head = delivered if header_end < 0 else delivered[:header_end + 1]
    fields: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    stripped = 0
    for number, field in enumerate(fields):
        lowered = field.lower()
        ours = lowered.startswith(_PREPENDED) or (
            lowered.startswith(b"received:") and f"by {backend_hostname} (postfix)".encode()
            in b" ".join(lowered.split()))
        if not ours:
            break
        stripped += len(field)
        if lowered.startswith(b"received:"):  # only the backend's own, and the gate's
            following = fields[number + 1] if number + 1 < len(fields) else b""
            if following.startswith(b"Received: ") and b"(Portcullis)" in following:
                stripped += len(following)
            break
    return delivered[stripped:].replace(b"\n", b"\r\n")


class Blackhole:
    """A TCP listener that accepts connections and never sends a byte."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port or 0))
        self.listener.listen(128)
        self.listener.settimeout(0.2)
        self.host, self.port = host, self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._hold, name="blackhole", daemon=True)
        self._thread.start()

    def _hold(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted.append(connection)

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        for connection in self.accepted:
            connection.close()
        self.listener.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class PostfixSender(PostfixInstance):
    """A Postfix that takes mail on 127.0.0.1:<port> and relays it all to `relay`
    ("host:port"), retrying from its queue after a deferral within seconds, not
    minutes: a real MTA's behaviour, sped up (for greylisting's tests)."""

    def __init__(self, relay: str, retry_seconds: int = 1):
        self.port = free_port()
        super().__init__({
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks reject",
            "relayhost": f"[{relay.rpartition(':')[0]}]:{relay.rpartition(':')[2]}",
            "default_transport": "smtp",
            "relay_transport": "smtp",
            "smtp_helo_name": "sender.example.net",
            "smtp_tls_security_level": "none",
            "queue_run_delay": f"{retry_seconds}s",
            "minimal_backoff_time": f"{retry_seconds}s",
            "maximal_backoff_time": f"{retry_seconds}s",
        }, f"127.0.0.1:{self.port} inet n - n - - smtpd\n"
           "smtp       unix  - - n -    - smtp\n", name="sender")

    def ready(self) -> bool:
        return super().ready() and port_accepts("127.0.0.1", self.port)

    def deliveries(self) -> list[str]:
        """The status of each delivery attempt in the log: sent, deferred, bounced."""
        return re.findall(r" status=(\w+)", self.log())
