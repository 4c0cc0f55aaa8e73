"""A private OpenLDAP slapd for the tests: its own config, mdb database and loopback ports.

It never touches the system slapd (Debian's package may or may not have configured one).
The tree is written with slapadd before start, so no network write is needed:

    dc=example,dc=test
      ou=people    inetOrgPerson entries with `mail` and, for aliases, `mailAlternateAddress`
      ou=services  cn=gate, the account the gate binds as (read access only)

`mailAlternateAddress` is not in any core schema; a two-line schema of our own defines
it so that the production default filter runs unchanged against this server.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support.tools import (
    free_port,
    port_accepts,
    require_tool,
    run_checked,
    stop_process,
    wait_until,
)

SUFFIX = "dc=example,dc=test"
GATE_DN = f"cn=gate,ou=services,{SUFFIX}"
GATE_PASSWORD = "gate-secret"
SCHEMA_DIR = Path("/etc/ldap/schema")

# OIDs under 1.3.6.1.4.1.32473, the enterprise number RFC 5612 reserves for documentation.
MAIL_ALIAS_SCHEMA = """\
attributetype ( 1.3.6.1.4.1.32473.1.1.1 NAME 'mailAlternateAddress'
    DESC 'another address delivered to this entry'
    EQUALITY caseIgnoreIA5Match SUBSTR caseIgnoreIA5SubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.26{256} )
objectclass ( 1.3.6.1.4.1.32473.1.2.1 NAME 'mailAliasHolder' SUP top AUXILIARY
    MAY mailAlternateAddress )
"""


@dataclass
class Person:
    uid: str
    mail: str
    aliases: tuple[str, ...] = ()


class Slapd:
    """One slapd process. `start()` after `__init__`; `kill()`, `pause()` and `start()`
    again simulate an outage, a hung server and its return on the same ports."""

    def __init__(self, workdir: Path, people: list[Person], tls: TestCertificates | None = None):
        self.slapd = require_tool("slapd", "slapd")
        self.slapadd = require_tool("slapadd", "slapd")
        self.dir = workdir
        self.tls = tls
        self.port = free_port()
        self.ldaps_port = free_port() if tls else None
        self.process: subprocess.Popen | None = None
        self.log_path = workdir / "slapd.log"
        (workdir / "db").mkdir(parents=True)
        (workdir / "mail-alias.schema").write_text(MAIL_ALIAS_SCHEMA)
        self.config_path = workdir / "slapd.conf"
        self.config_path.write_text(self._config())
        (workdir / "tree.ldif").write_text(_tree_ldif(people))
        run_checked([self.slapadd, "-q", "-f", str(self.config_path),
                     "-l", str(workdir / "tree.ldif")])

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.ldaps_port}"

    def _config(self) -> str:
        schemas = [SCHEMA_DIR / f"{name}.schema" for name in ("core", "cosine", "inetorgperson")]
        lines = [f"include {path}" for path in schemas]
        lines += [
            f"include {self.dir / 'mail-alias.schema'}",
            f"pidfile {self.dir / 'slapd.pid'}",
            "modulepath /usr/lib/ldap",
            "moduleload back_mdb",
        ]
        if self.tls:
            lines += [
                f"TLSCACertificateFile {self.tls.ca_cert}",
                f"TLSCertificateFile {self.tls.server_cert}",
                f"TLSCertificateKeyFile {self.tls.server_key}",
            ]
        lines += [
            "database mdb",
            "maxsize 16777216",
            f'suffix "{SUFFIX}"',
            f'rootdn "cn=admin,{SUFFIX}"',
            "rootpw admin-secret",
            f"directory {self.dir / 'db'}",
            "index objectClass,mail,mailAlternateAddress eq",
            "access to attrs=userPassword by anonymous auth by * none",
            "access to * by users read by * none",
        ]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10.0) -> None:
        urls = self.url + (f" {self.ldaps_url}" if self.tls else "")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [self.slapd, "-d", "0", "-f", str(self.config_path), "-h", urls],
                stdout=log, stderr=subprocess.STDOUT,
            )
        ports = [self.port] + ([self.ldaps_port] if self.tls else [])

        def listening() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"slapd exited at start: {self.log_path.read_text()[-2000:]}")
            return all(port_accepts("127.0.0.1", port) for port in ports)

        try:
            wait_until(listening, timeout, "slapd to listen")
        except TimeoutError:
            self.stop()
            raise

    def kill(self) -> None:
        """Die abruptly, as a crashed server would: open connections are reset."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def pause(self) -> None:
        """Stop answering while keeping connections open: a hung or overloaded server."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a paused server must see the SIGTERM
        stop_process(self.process)


class TestCertificates:
    """A throw-away CA and a server certificate for 127.0.0.1 and localhost, made by openssl."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, workdir: Path):
        openssl = require_tool("openssl", "openssl")
        workdir.mkdir(parents=True, exist_ok=True)
        self.ca_cert = workdir / "ca.crt"
        self.server_cert = workdir / "server.crt"
        self.server_key = workdir / "server.key"
        ca_key, csr, extensions = workdir / "ca.key", workdir / "server.csr", workdir / "ext.cnf"
        key_options = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        run_checked([openssl, "req", "-x509", *key_options, "-keyout", str(ca_key),
              "-out", str(self.ca_cert), "-subj", "/CN=Portcullis test CA", "-days", "2"])
        run_checked([openssl, "req", *key_options, "-keyout", str(self.server_key),
              "-out", str(csr), "-subj", "/CN=localhost"])
        extensions.write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")
        run_checked([openssl, "x509", "-req", "-in", str(csr), "-CA", str(self.ca_cert),
              "-CAkey", str(ca_key), "-CAcreateserial", "-out", str(self.server_cert),
              "-days", "2", "-extfile", str(extensions)])
        os.chmod(self.server_key, 0o600)


def _tree_ldif(people: list[Person]) -> str:
    entries = [
        f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Ex",
        f"dn: ou=people,{SUFFIX}\nobjectClass: organizationalUnit\nou: people",
        f"dn: ou=services,{SUFFIX}\nobjectClass: organizationalUnit\nou: services",
        f"dn: {GATE_DN}\nobjectClass: person\ncn: gate\nsn: gate\nuserPassword: {GATE_PASSWORD}",
    ]
    for person in people:
        lines = [f"dn: uid={person.uid},ou=people,{SUFFIX}", "objectClass: inetOrgPerson",
                 "objectClass: mailAliasHolder", f"uid: {person.uid}", f"cn: {person.uid}",
                 f"sn: {person.uid}", f"mail: {person.mail}"]
        lines += [f"mailAlternateAddress: {alias}" for alias in person.aliases]
        entries.append("\n".join(lines))
    return "\n\n".join(entries) + "\n"
