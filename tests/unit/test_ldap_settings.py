"""LDAP directory parts that need no server: filter escaping, settings checks, the cache."""

import json

import pytest
from portcullis.config import ConfigError, LdapDirectory, check, loads
from portcullis.policy import Lookup
from portcullis.policy.ldap_directory import (
    AnswerCache,
    LdapRecipientDirectory,
    escape_filter_value,
)


@pytest.mark.parametrize("value, escaped", [
    ("alice@example.org", "alice@example.org"),
    ("*", r"\2a"),
    ("*)(mail=*", r"\2a\29\28mail=\2a"),
    ("a\\b", r"a\5cb"),
    ("\\2a", r"\5c2a"),
    ("nul\0byte", r"nul\00byte"),
    ("(x)", r"\28x\29"),
    ("jürgen@exämple.org", "jürgen@exämple.org"),  # UTF-8 is sent as is
])
def test_escape_filter_value(value, escaped):
    assert escape_filter_value(value) == escaped


def make(**settings) -> LdapRecipientDirectory:
    directory = LdapRecipientDirectory(LdapDirectory(base="dc=example,dc=org", **settings))
    directory.close()
    return directory


LDAP_CONFIG = ("relay_domains: [example.org]\nbackend: {servers: ['127.0.0.1:2525']}\n"
               "reputation: {store: memory}\ntls: {enabled: false}\n"
               "recipients:\n  source: ldap\n  ldap:\n    base: dc=example,dc=org\n")


@pytest.mark.parametrize("settings, message", [
    ({"filter": "(mail=alice)"}, "line 9: key 'recipients.ldap.filter': must contain {addr}"),
    ({"filter": "(mail={addr}"}, "line 9: key 'recipients.ldap.filter': not a valid LDAP filter"),
    ({"filter": "mail={addr})("}, "line 9: key 'recipients.ldap.filter': not a valid LDAP filter"),
    ({"url": "http://ldap.example.org"}, ("line 9: key 'recipients.ldap.url': "
                                         "'http://ldap.example.org' must start with ldap://")),
    ({"url": "ldaps://ldap.example.org", "starttls": True},
     "line 10: key 'recipients.ldap.starttls': use either ldaps:// or starttls, not both"),
    ({"bind_dn": "cn=gate,dc=example,dc=org"},
     "line 7: key 'recipients.ldap.password_file': give both"),
    ({"password_file": "/nonexistent/password"}, "line 7: key 'recipients.ldap.bind_dn': give both"),
    ({"bind_dn": "cn=gate", "password_file": "/nonexistent/password"},
     ("line 10: key 'recipients.ldap.password_file': cannot read /nonexistent/password: "
     "No such file or directory")),
    ({"ca_file": "/nonexistent/ca.crt", "starttls": True},
     "line 9: key 'recipients.ldap.ca_file': cannot read /nonexistent/ca.crt: No such file"),
])
def test_bad_settings_name_the_key_and_line(settings, message):
    text = LDAP_CONFIG + "".join(f"    {key}: {json.dumps(value)}\n"
                                 for key, value in settings.items())
    with pytest.raises(ConfigError) as error:
        check(loads(text, "x.yaml"))
    assert f"x.yaml {message}" in str(error.value)


def test_the_password_is_the_first_line_without_its_line_end(tmp_path):
    path = tmp_path / "password"
    path.write_text(" pass word \r\nsecond line\n")
    directory = make(bind_dn="cn=gate", password_file=str(path))
    assert directory._password == " pass word "


def test_config_file_keys_reach_the_directory_settings():
    config = loads(
        "relay_domains: [example.org]\nbackend: {servers: ['127.0.0.1:2525']}\n"
        "recipients:\n  source: ldap\n  ldap:\n    base: dc=example,dc=org\n"
        "    cache_size: 0\n    negative_ttl: 30\n")
    assert (config.recipients.ldap.cache_size, config.recipients.ldap.negative_ttl) == (0, 30.0)
    with pytest.raises(ConfigError, match="line 7: key 'recipients.ldap.cache_size'"):
        loads("relay_domains: [example.org]\nbackend: {servers: ['127.0.0.1:2525']}\n"
              "recipients:\n  source: ldap\n  ldap:\n    base: dc=example,dc=org\n"
              "    cache_size: -1\n")


def test_cache_keeps_each_kind_for_its_own_ttl():
    cache = AnswerCache(positive_ttl=100, negative_ttl=10, max_entries=10)
    cache.put("found", Lookup.VALID, now=0)
    cache.put("unknown", Lookup.UNKNOWN, now=0)
    cache.put("unsure", Lookup.TEMPFAIL, now=0)
    assert (cache.get("found", 9), cache.get("unknown", 9)) == (Lookup.VALID, Lookup.UNKNOWN)
    assert cache.get("unsure", 0) is None
    assert (cache.get("found", 10), cache.get("unknown", 10)) == (Lookup.VALID, None)
    assert cache.get("found", 100) is None
    assert len(cache) == 0


def test_cache_drops_the_oldest_when_full():
    cache = AnswerCache(positive_ttl=100, negative_ttl=100, max_entries=3)
    for index in range(5):
        cache.put(f"a{index}", Lookup.VALID, now=index)
    assert [cache.get(f"a{index}", 5) for index in range(5)] == [None, None] + [Lookup.VALID] * 3


def test_a_zero_size_or_ttl_caches_nothing():
    for cache in (AnswerCache(100, 100, 0), AnswerCache(0, 0, 100)):
        cache.put("a", Lookup.VALID, now=0)
        cache.put("b", Lookup.UNKNOWN, now=0)
        assert len(cache) == 0
