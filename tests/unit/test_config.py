"""The configuration schema: defaults, and errors that name the key and the line."""

import dataclasses
import typing

import pytest
from portcullis import config
from portcullis.config import ConfigError

MINIMAL = "relay_domains: [example.test]\nbackend:\n  servers: ['127.0.0.1:25']\n"


def test_minimal_config_gets_documented_defaults():
    c = config.loads(MINIMAL)
    assert c.limits.max_recipients == 100
    assert c.limits.max_connections >= 256
    assert c.workers >= 1
    assert c.backend.helo == c.hostname
    assert c.listen == [config.HostPort("0.0.0.0", 25)]


def test_example_config_is_valid():
    c = config.load("etc/portcullis.example.yaml")
    assert c.listen[1] == config.HostPort("::", 25)
    assert c.is_relay_domain("EXAMPLE.org.")


@pytest.mark.parametrize("text, message", [
    (MINIMAL + "limits:\n  max_recipients: lots\n", "line 5: key 'limits.max_recipients': must be an integer"),
    (MINIMAL + "limits:\n  max_recipients: 0\n", "line 5: key 'limits.max_recipients': must be at least 1"),
    (MINIMAL + "limitz: {}\n", "line 4: key 'limitz': unknown key"),
    (MINIMAL + "listen: ['0.0.0.0']\n", "line 4: key 'listen': '0.0.0.0' needs a port"),
    (MINIMAL + "allowlist: [10.0.0.300/8]\n", "line 4: key 'allowlist': '10.0.0.300/8' is not a network"),
    (MINIMAL + "tls:\n  enabled: maybe\n", "line 5: key 'tls.enabled': must be true or false"),
    (MINIMAL + "recipients: {source: sql}\n", "line 4: key 'recipients.source': must be one of static, ldap"),
    ("relay_domains: [a]\nbackend: {servers: []}\n", "key 'backend.servers': list at least one"),
    ("backend: {servers: ['h:25']}\n", "key 'relay_domains': list at least one domain"),
    ("relay_domains: [a\n", "line 2: not valid YAML"),
])
def test_errors_name_key_and_line(text, message):
    with pytest.raises(ConfigError) as error:
        config.loads(text, "site.yaml")
    assert message in str(error.value)
    assert str(error.value).startswith("site.yaml")


@pytest.mark.parametrize("text", [
    "[" * 2000,  # found by fuzzing: the YAML parser recursed until Python stopped it
    "relay_domains: " + "[" * 2000 + "]" * 2000 + "\n",
    "a: &x " + "{b: " * 2000 + "1" + "}" * 2000 + "\n",
], ids=["unclosed", "in a key", "mappings"])
def test_deeply_nested_yaml_is_a_clear_error(text):
    with pytest.raises(ConfigError, match="site.yaml: nested too deeply"):
        config.loads(text, "site.yaml")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(str(tmp_path / "absent.yaml"))


def test_a_key_that_is_not_a_name_is_an_error_with_its_line():  # found by fuzzing
    with pytest.raises(ConfigError, match=r"x.yaml line 5: key 'limits': keys must be plain names"):
        config.loads(MINIMAL + "limits:\n  [a, b]: 1\n", "x.yaml")


def test_an_empty_value_is_an_error_with_its_line_not_a_traceback():  # found by fuzzing
    with pytest.raises(ConfigError, match=r"x.yaml line 4: key 'hostname': must be a string"):
        config.loads(MINIMAL + "hostname: # nothing\n", "x.yaml")


def numeric_fields(cls=config.Config, prefix=""):
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            yield from numeric_fields(hint, f"{prefix}{f.name}.")
        elif hint in (int, float):
            yield f"{prefix}{f.name}", f.metadata


def test_every_number_has_bounds():
    unbounded = [key for key, meta in numeric_fields()
                 if meta.get("minimum") is None or meta.get("maximum") is None]
    assert unbounded == []


@pytest.mark.parametrize("text, message", [
    ("workers: 1025\n", "line 4: key 'workers': must be at most 1024, got 1025"),
    ("limits: {ipv4_prefix: 33}\n", "line 4: key 'limits.ipv4_prefix': must be at most 32"),
    ("limits: {ipv6_prefix: 129}\n", "line 4: key 'limits.ipv6_prefix': must be at most 128"),
    ("limits: {ipv6_client_prefix: 129}\n",
     "line 4: key 'limits.ipv6_client_prefix': must be at most 128"),
    ("limits: {max_tracked_clients: 10000001}\n",
     "line 4: key 'limits.max_tracked_clients': must be at most 10000000"),
    ("limits: {stress_threshold: 1.5}\n", "line 4: key 'limits.stress_threshold': must be at most 1"),
    ("limits: {command_timeout: .nan}\n", "line 4: key 'limits.command_timeout': must be a finite"),
    ("limits: {session_timeout: -.inf}\n", "line 4: key 'limits.session_timeout': must be a finite"),
    ("limits: {command_timeout: 1.0e+999}\n", "line 4: key 'limits.command_timeout': must be a finite"),
    ("limits: {command_timeout: %s}\n" % ("9" * 400),
     "line 4: key 'limits.command_timeout': must be a finite"),
    ("dha: {window: .inf}\n", "line 4: key 'dha.window': must be a finite number"),
    ("limits:\n  max_recipient: 5\n",
     "line 5: key 'limits.max_recipient': unknown key; did you mean 'max_recipients'?"),
    ("relay_domains: [example.org]\n", "line 4: key 'relay_domains': given twice"),
])
def test_bounds_and_suggestions(text, message):
    with pytest.raises(ConfigError) as error:
        config.loads(MINIMAL + text, "site.yaml")
    assert f"site.yaml {message}" in str(error.value)


@pytest.mark.parametrize("domain", [
    "exa mple.org", "-a.org", "a-.org", "a..org", "a_b.org", "", ".", "1.2.3.4", "x" * 64 + ".org",
    ".".join(["abcdefghi"] * 26),  # 259 characters
])
def test_a_relay_domain_is_a_domain_name(domain):
    with pytest.raises(ConfigError, match="line 1: key 'relay_domains': .* not a domain name"):
        config.loads(f"relay_domains: ['{domain}']\nbackend: {{servers: ['127.0.0.1:25']}}\n")


def test_relay_domains_are_strings_in_one_form():
    with pytest.raises(ConfigError, match="line 1: key 'relay_domains': must be a string, got '42'"):
        config.loads("relay_domains: [example.org, 42]\nbackend: {servers: ['127.0.0.1:25']}\n")
    c = config.loads("relay_domains: [Example.ORG., xn--bcher-kva.example, a.b-c.d1]\n"
                     "backend: {servers: ['127.0.0.1:25']}\n")
    assert c.relay_domains == ["example.org", "xn--bcher-kva.example", "a.b-c.d1"]


@pytest.mark.parametrize("listen, problem", [
    ("300.1.1.1:25", "'300.1.1.1' is not an IP address or host name"),
    ("[10.0.0.1]:25", "brackets go only around an IPv6 address"),
    ("[::1:25", "'[::1:25' needs a port"),
    ("mx.example.org:0", "has an invalid port"),
])
def test_a_listen_host_is_an_address_or_a_host_name(listen, problem):
    with pytest.raises(ConfigError) as error:
        config.loads(MINIMAL + f"listen: ['{listen}']\n", "site.yaml")
    assert "site.yaml line 4: key 'listen': " in str(error.value)
    assert problem in str(error.value)


@pytest.mark.parametrize("text, message", [
    ("tls: {cert_file: /a.crt}\n", "line 4: key 'tls.key_file': give both"),
    ("tls:\n  enabled: true\n  key_file: /a.key\n", "line 4: key 'tls.cert_file': give both"),
    ("recipients:\n  source: ldap\n  ldap:\n    base: dc=x\n    url: ldaps://h\n    starttls: true\n",
     "line 9: key 'recipients.ldap.starttls': use either ldaps:// or starttls, not both"),
    ("recipients:\n  source: ldap\n  ldap: {base: dc=x, bind_dn: cn=gate}\n",
     "line 6: key 'recipients.ldap.password_file': give both"),
    ("recipients:\n  source: ldap\n", "line 4: key 'recipients.ldap.base': required"),
    ("dha:\n  tarpit_after: 4\n  suspect_after: 3\n",
     "line 6: key 'dha.suspect_after': must not be below 'dha.tarpit_after' (4), got 3"),
])
def test_rules_across_keys_name_a_line(text, message):
    with pytest.raises(ConfigError) as error:
        config.loads(MINIMAL + text, "site.yaml")
    assert f"site.yaml {message}" in str(error.value)


def test_file_paths_are_relative_to_the_config_file(tmp_path):
    (tmp_path / "etc").mkdir()
    c = config.loads(MINIMAL + "state_dir: state\nrecipients: {file: ../recipients}\n"
                     "tls: {cert_file: /abs.crt, key_file: k.pem}\n",
                     str(tmp_path / "etc" / "x.yaml"))
    assert c.state_dir == str(tmp_path / "etc" / "state")
    assert c.recipients.file == str(tmp_path / "recipients")
    assert (c.tls.cert_file, c.tls.key_file) == ("/abs.crt", str(tmp_path / "etc" / "k.pem"))


def test_load_checks_the_files_the_config_names(tmp_path):
    """What check-config, serve and a reload run: load() checks the referenced files too."""
    path = tmp_path / "x.yaml"
    path.write_text(MINIMAL + f"state_dir: {tmp_path}\nrecipients:\n  file: /nope\n")
    with pytest.raises(ConfigError) as error:
        config.load(str(path))
    assert str(error.value) == (f"{path} line 6: key 'recipients.file': cannot read /nope: "
                                "No such file or directory")
    assert config.loads(path.read_text()).recipients.file == "/nope"  # no I/O in loads
