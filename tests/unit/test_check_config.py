"""`check-config` runs what `serve` runs before it binds: every error names the file, the
line and the key, exit status 2, and no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest
from portcullis import cli

ROOT = Path(__file__).resolve().parents[2]


def write_config(tmp_path: Path, **keys: str) -> Path:
    """A good configuration, one top-level key a line; `keys` replace or add lines."""
    (tmp_path / "recipients").write_text("postmaster@example.org\n")
    values = {
        "relay_domains": "[example.org]",
        "backend": "{servers: ['127.0.0.1:2525']}",
        "listen": "['127.0.0.1:2525']",
        "state_dir": f"{tmp_path}/state",
        "recipients": f"{{file: {tmp_path}/recipients}}",
        "tls": f"{{generated_dir: {tmp_path}/tls}}",
        **keys,
    }
    path = tmp_path / "x.yaml"
    path.write_text("".join(f"{key}: {value}\n" for key, value in values.items()))
    return path


def line_of(path: Path, top_key: str) -> int:
    lines = path.read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1) if line.startswith(f"{top_key}:"))


def run(capsys, command: str, path: Path) -> tuple[int, str]:
    status = cli.main([command, "-c", str(path)])
    return status, capsys.readouterr().err


def test_a_good_file_passes(tmp_path, capsys):
    status, _ = run(capsys, "check-config", write_config(tmp_path))
    assert status == 0
    assert not (tmp_path / "state").exists()  # checked, not created


def test_the_shipped_example_passes(capsys):
    assert run(capsys, "check-config", ROOT / "etc/portcullis.example.yaml") == (0, "")


CASES = [
    ({"listen": "['300.1.1.1:25']"}, "listen", "'300.1.1.1' is not an IP address or host name"),
    ({"listen": "['nonexistent.invalid:25']"}, "listen", "cannot resolve nonexistent.invalid"),
    ({"listen": "['[mx.example.org]:25']"}, "listen", "'[mx.example.org]:25': brackets go only around an IPv6 address"),
    ({"state_dir": "/proc/nope"}, "state_dir", "cannot create /proc/nope"),
    ({"metrics": "{listen: '127.0.0.1:2525'}"}, "metrics.listen",
     "127.0.0.1:2525 clashes with the SMTP listener 127.0.0.1:2525"),
    ({"metrics": "{listen: '0.0.0.0:2525'}"}, "metrics.listen",
     "0.0.0.0:2525 clashes with the SMTP listener 127.0.0.1:2525"),
    ({"listen": "['0.0.0.0:2525', '127.0.0.1:2525']"}, "listen",
     "127.0.0.1:2525 clashes with the SMTP listener 0.0.0.0:2525"),
    ({"workers": "99999999999999999999999"}, "workers",
     "must be at most 1024, got 99999999999999999999999"),
    ({"limits": "{pregreet_delay: .nan}"}, "limits.pregreet_delay", "must be a finite number"),
    ({"limits": "{pregreet_delay: .inf}"}, "limits.pregreet_delay", "must be a finite number"),
    ({"limits": "{ipv6_client_prefix: 129}"}, "limits.ipv6_client_prefix", "must be at most 128"),
    ({"relay_domains": "['exa mple']"}, "relay_domains", "'exa mple' is not a domain name"),
    ({"relay_domains": "[example.org, 42]"}, "relay_domains", "must be a string, got '42'"),
    ({"hostname": "mx_1.example.org"}, "hostname", "'mx_1.example.org' is not a domain name"),
    ({"backend": "{servers: ['127.0.0.1:25'], helo: '-bad.example.org'}"}, "backend.helo",
     "'-bad.example.org' is not a domain name"),
    ({"limitz": "{}"}, "limitz", "unknown key; did you mean 'limits'?"),
    ({"recipients": "{file: /nope}"}, "recipients.file",
     "cannot read /nope: No such file or directory"),
    ({"tls": "{cert_file: /nope.crt, key_file: /nope.key}"}, "tls.cert_file",
     "cannot read /nope.crt: No such file or directory"),
    ({"tls": "{cert_file: /nope.crt}"}, "tls.key_file", "give both"),
    ({"recipients": "{source: ldap, ldap: {base: 'dc=example', bind_dn: 'cn=gate', "
                    "password_file: /nope}}"},
     "recipients.ldap.password_file", "cannot read /nope: No such file or directory"),
    ({"recipients": "{source: ldap, ldap: {base: 'dc=example', ca_file: /nope}}"},
     "recipients.ldap.ca_file", "cannot read /nope: No such file or directory"),
    ({"recipients": "{source: ldap, ldap: {base: 'dc=example', url: 'http://x'}}"},
     "recipients.ldap.url", "'http://x' must start with ldap:// or ldaps://"),
    ({"ban_helper": "{table: 'a b'}"}, "ban_helper.table", "'a b' is not an nftables name"),
    ({"dns": "{nameservers: ['dns.example.org:53']}"}, "dns.nameservers",
     "'dns.example.org:53' must be an IP address and port"),
]


@pytest.mark.parametrize("keys, dotted, problem", CASES)
def test_check_config_refuses_what_serve_refuses(tmp_path, capsys, keys, dotted, problem):
    path = write_config(tmp_path, **keys)
    status, err = run(capsys, "check-config", path)
    line = line_of(path, dotted.split(".")[0])
    assert status == 2, err
    assert err.startswith("portcullis: configuration error: ")
    assert f"{path} line {line}: key '{dotted}': {problem}" in err
    assert "Traceback" not in err


def test_a_bad_recipient_list_names_both_files(tmp_path, capsys):
    path = write_config(tmp_path)
    (tmp_path / "recipients").write_text("alice@example.org\nnot an address\n")
    status, err = run(capsys, "check-config", path)
    assert status == 2
    assert (f"{path} line {line_of(path, 'recipients')}: key 'recipients.file': "
            f"{tmp_path}/recipients line 2: 'not an address' is not an address") in err


def test_a_tls_pair_that_does_not_load_names_the_key(tmp_path, capsys):
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    path = write_config(tmp_path, tls=f"{{cert_file: {tmp_path}/cert.pem, "
                                      f"key_file: {tmp_path}/cert.pem}}")
    status, err = run(capsys, "check-config", path)
    assert status == 2
    assert f"{path} line {line_of(path, 'tls')}: key 'tls.cert_file': " in err
    assert "not a PEM certificate and its key" in err


def test_relative_paths_are_relative_to_the_config_file(tmp_path, capsys, monkeypatch):
    path = write_config(tmp_path, recipients="{file: recipients}", state_dir="state")
    monkeypatch.chdir("/")
    assert run(capsys, "check-config", path)[0] == 0


@pytest.mark.parametrize("keys, dotted, problem", [
    ({"state_dir": "/proc/nope"}, "state_dir", "cannot create /proc/nope"),
    ({"recipients": "{file: /nope}"}, "recipients.file", "cannot read /nope"),
    ({"tls": "{cert_file: /nope.crt, key_file: /nope.key}"}, "tls.cert_file",
     "cannot read /nope.crt"),
])
def test_serve_refuses_the_same_way_before_it_starts(tmp_path, capsys, keys, dotted, problem):
    path = write_config(tmp_path, **keys)
    status, err = run(capsys, "serve", path)
    assert status == 2
    assert f"{path} line {line_of(path, dotted.split('.')[0])}: key '{dotted}': {problem}" in err


def test_serve_refuses_a_metrics_port_on_an_smtp_listener_without_a_traceback(tmp_path):
    path = write_config(tmp_path, metrics="{listen: '127.0.0.1:2525'}")
    result = subprocess.run([sys.executable, "-m", "portcullis.cli", "serve", "-c", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    assert f"{path} line 7: key 'metrics.listen': " in result.stderr
    assert "Traceback" not in result.stderr
