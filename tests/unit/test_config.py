"""The configuration schema: defaults, and errors that name the key and the line."""

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


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(str(tmp_path / "absent.yaml"))


def test_a_key_that_is_not_a_name_is_an_error_with_its_line():  # found by fuzzing
    with pytest.raises(ConfigError, match=r"x.yaml line 5: key 'limits': keys must be plain names"):
        config.loads(MINIMAL + "limits:\n  [a, b]: 1\n", "x.yaml")


def test_an_empty_value_is_an_error_with_its_line_not_a_traceback():  # found by fuzzing
    with pytest.raises(ConfigError, match=r"x.yaml line 4: key 'hostname': must be a string"):
        config.loads(MINIMAL + "hostname: # nothing\n", "x.yaml")
