"""The LDAP recipient directory against a real slapd started here (tests/support/slapd.py)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from dataclasses import replace

import ldap3
import pytest
from portcullis.config import LdapDirectory
from portcullis.policy import Lookup
from portcullis.policy.ldap_directory import LdapRecipientDirectory

from tests.support.slapd import GATE_DN, GATE_PASSWORD, SUFFIX, Person, Slapd, TestCertificates

PEOPLE = [
    Person("alice", "alice@example.test", ("a.liddell@example.test", "alice@alias.test")),
    Person("bob", "bob@example.test"),
    # Every character RFC 4515 makes special, in a real (quoted-local-part) address.
    Person("odd", r"star*paren(x)back\slash@example.test"),
]
TIMEOUT = 1.0


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    return TestCertificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def slapd(tmp_path_factory, certificates):
    """One server for the tests that leave it running: plain ldap:// and ldaps://."""
    server = Slapd(tmp_path_factory.mktemp("slapd"), PEOPLE, tls=certificates)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_slapd(tmp_path, certificates):
    """A server of the test's own, for tests that kill or freeze it."""
    server = Slapd(tmp_path / "slapd", PEOPLE, tls=certificates)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def password_file(tmp_path):
    path = tmp_path / "bind-password"
    path.write_text(GATE_PASSWORD + "\n")
    return str(path)


def settings_for(url: str, password_file: str, **overrides) -> LdapDirectory:
    return replace(LdapDirectory(url=url, bind_dn=GATE_DN, password_file=password_file,
                                 base=SUFFIX, timeout=TIMEOUT, pool_size=2), **overrides)


def lookups(settings: LdapDirectory, addresses, between=None):
    """Look up each address in order on one directory; `between(i)` runs before the i-th."""
    async def run():
        directory = LdapRecipientDirectory(settings)
        answers = []
        try:
            for index, address in enumerate(addresses):
                if between:
                    between(index)
                answers.append(await directory.lookup(address))
        finally:
            directory.close()
        return answers, directory
    return asyncio.run(run())


def test_finds_an_address_by_mail_and_by_alias(slapd, password_file):
    answers, _ = lookups(settings_for(slapd.url, password_file), [
        "alice@example.test", "ALICE@Example.TEST", "a.liddell@example.test",
        "alice@alias.test", "bob@example.test"])
    assert answers == [Lookup.VALID] * 5


def test_unknown_addresses_are_unknown(slapd, password_file):
    answers, directory = lookups(settings_for(slapd.url, password_file), [
        "carol@example.test", "alice@elsewhere.test", "alice", "bob@example.test.evil"])
    assert answers == [Lookup.UNKNOWN] * 4
    assert directory.tempfails == 0


def test_the_wildcard_attack_works_on_this_server_when_unescaped(slapd):
    """The injection test below is meaningful: a raw `*` does match entries here."""
    connection = ldap3.Connection(ldap3.Server(slapd.url), GATE_DN, GATE_PASSWORD,
                                  auto_bind=True)
    connection.search(SUFFIX, "(|(mail=*)(mail=*)(mailAlternateAddress=*))", attributes=[])
    assert len(connection.entries) == len(PEOPLE)
    connection.unbind()


@pytest.mark.parametrize("address", [
    "*", "*)(mail=*", "*)(|(mail=*", "alice*", "*@example.test", "alice@example.test)(mail=*",
    "\\2a", "al\\69ce@example.test", "(mail=*)",
])
def test_filter_injection_finds_nothing(slapd, password_file, address):
    answers, directory = lookups(settings_for(slapd.url, password_file), [address])
    assert answers == [Lookup.UNKNOWN]
    assert directory.tempfails == 0


def test_control_characters_are_unknown_without_a_search(slapd, password_file):
    """slapd ends an escaped value at a NUL (\\00), so `alice@example.test<NUL>x` would
    match alice: such addresses never reach the directory."""
    answers, directory = lookups(settings_for(slapd.url, password_file), [
        "alice@example.test\0", "alice@example.test\0x", "alice@example.test\r\n"])
    assert answers == [Lookup.UNKNOWN] * 3
    assert directory.cache_misses == 0


def test_special_characters_match_literally(slapd, password_file):
    answers, _ = lookups(settings_for(slapd.url, password_file), [
        r"star*paren(x)back\slash@example.test", r"star*paren(x)back\slash@example.tes*"])
    assert answers == [Lookup.VALID, Lookup.UNKNOWN]


def test_cache_answers_repeats_and_counts_hits(slapd, password_file):
    known = [f"{p.uid}@example.test" for p in PEOPLE[:2]]
    unknown = [f"nobody{i}@example.test" for i in range(8)]
    addresses = (known + unknown) * 5  # 10 distinct addresses, each asked 5 times
    answers, directory = lookups(settings_for(slapd.url, password_file), addresses)
    assert answers == ([Lookup.VALID] * 2 + [Lookup.UNKNOWN] * 8) * 5
    assert (directory.cache_misses, directory.cache_hits) == (10, 40)
    assert directory.cache_hit_rate == pytest.approx(0.8)


def test_cached_answers_survive_an_outage(own_slapd, password_file):
    def kill_after_first(index):
        if index == 1:
            own_slapd.kill()
    answers, directory = lookups(
        settings_for(own_slapd.url, password_file),
        ["alice@example.test", "alice@example.test", "carol@example.test"], kill_after_first)
    assert answers == [Lookup.VALID, Lookup.VALID, Lookup.TEMPFAIL]
    assert (directory.cache_hits, directory.tempfails) == (1, 1)


def test_negative_answers_expire_so_new_mailboxes_appear(own_slapd, password_file):
    def add_carol(index):
        if index == 1:
            ldif = (f"dn: uid=carol,ou=people,{SUFFIX}\nobjectClass: inetOrgPerson\n"
                    "uid: carol\ncn: carol\nsn: carol\nmail: carol@example.test\n")
            subprocess.run(["ldapadd", "-x", "-H", own_slapd.url, "-D", f"cn=admin,{SUFFIX}",
                            "-w", "admin-secret"], input=ldif, text=True, check=True,
                           capture_output=True, timeout=30)
        if index == 2:
            time.sleep(0.6)  # past negative_ttl
    settings = settings_for(own_slapd.url, password_file, negative_ttl=0.5)
    answers, _ = lookups(settings, ["carol@example.test"] * 3, add_carol)
    assert answers == [Lookup.UNKNOWN, Lookup.UNKNOWN, Lookup.VALID]


def test_killed_directory_tempfails_within_the_timeout_then_recovers(own_slapd, password_file):
    async def run():
        directory = LdapRecipientDirectory(
            settings_for(own_slapd.url, password_file, positive_ttl=0, negative_ttl=0))
        try:
            assert await directory.lookup("alice@example.test") == Lookup.VALID
            own_slapd.kill()
            started = time.monotonic()
            down = [await directory.lookup("alice@example.test") for _ in range(3)]
            elapsed = time.monotonic() - started
            own_slapd.start()
            back = await directory.lookup("alice@example.test")
            unknown = await directory.lookup("carol@example.test")
            return down, elapsed, back, unknown, directory.tempfails
        finally:
            directory.close()
    down, elapsed, back, unknown, tempfails = asyncio.run(run())
    assert down == [Lookup.TEMPFAIL] * 3
    assert elapsed < 3 * TIMEOUT  # each answer within its timeout
    assert (back, unknown, tempfails) == (Lookup.VALID, Lookup.UNKNOWN, 3)


def test_a_restarted_directory_answers_the_first_lookup(own_slapd, password_file):
    async def run():
        directory = LdapRecipientDirectory(
            settings_for(own_slapd.url, password_file, positive_ttl=0))
        try:
            # Two lookups at once leave two connections in the pool ...
            warm = await asyncio.gather(*(directory.lookup("alice@example.test") for _ in "ab"))
            own_slapd.kill()
            own_slapd.start()
            # ... which died with the old server: the first lookup must still succeed on
            # a new connection, not cost the sender a retry.
            return warm, await directory.lookup("alice@example.test"), directory.tempfails
        finally:
            directory.close()
    warm, first, tempfails = asyncio.run(run())
    assert warm == [Lookup.VALID] * 2
    assert (first, tempfails) == (Lookup.VALID, 0)


def test_hung_directory_tempfails_without_blocking_the_loop(own_slapd, password_file):
    async def ticker(ticks):
        while True:
            await asyncio.sleep(0.01)
            ticks.append(time.monotonic())

    async def run():
        directory = LdapRecipientDirectory(
            settings_for(own_slapd.url, password_file, positive_ttl=0))
        ticks = []
        ticking = asyncio.create_task(ticker(ticks))
        try:
            assert await directory.lookup("alice@example.test") == Lookup.VALID
            own_slapd.pause()
            started = time.monotonic()
            hung = await asyncio.gather(*(directory.lookup(f"u{i}@example.test")
                                          for i in range(6)))
            elapsed = time.monotonic() - started
            ticks_while_hung = sum(1 for t in ticks if t > started)
            own_slapd.resume()
            await asyncio.sleep(2 * TIMEOUT)  # the stuck searches end and free the pool
            back = await directory.lookup("alice@example.test")
            return hung, elapsed, ticks_while_hung, back
        finally:
            ticking.cancel()
            own_slapd.resume()
            directory.close()
    hung, elapsed, ticks_while_hung, back = asyncio.run(run())
    assert hung == [Lookup.TEMPFAIL] * 6
    assert elapsed < 2 * TIMEOUT, elapsed  # six lookups on a pool of two: one timeout each
    assert ticks_while_hung >= 10, ticks_while_hung  # the loop ran while the searches hung
    assert back == Lookup.VALID


def test_ldaps_with_the_configured_ca(slapd, password_file, certificates):
    settings = settings_for(slapd.ldaps_url, password_file, ca_file=str(certificates.ca_cert))
    answers, _ = lookups(settings, ["alice@example.test", "carol@example.test"])
    assert answers == [Lookup.VALID, Lookup.UNKNOWN]


def test_starttls_with_the_configured_ca(slapd, password_file, certificates):
    settings = settings_for(slapd.url, password_file, starttls=True,
                            ca_file=str(certificates.ca_cert))
    answers, _ = lookups(settings, ["alice@example.test", "carol@example.test"])
    assert answers == [Lookup.VALID, Lookup.UNKNOWN]


@pytest.mark.parametrize("use_starttls", [False, True])
def test_a_server_certificate_from_another_ca_is_refused(slapd, password_file, tmp_path,
                                                         use_starttls):
    other_ca = TestCertificates(tmp_path / "other").ca_cert
    url = slapd.url if use_starttls else slapd.ldaps_url
    settings = settings_for(url, password_file, starttls=use_starttls, ca_file=str(other_ca))
    answers, directory = lookups(settings, ["alice@example.test"])
    assert answers == [Lookup.TEMPFAIL]
    assert directory.tempfails == 1


def test_a_refused_bind_tempfails_and_reload_reads_the_new_password(slapd, tmp_path):
    password_file = tmp_path / "bind-password"
    password_file.write_text("wrong\n")

    async def run():
        directory = LdapRecipientDirectory(settings_for(slapd.url, str(password_file)))
        try:
            refused = await directory.lookup("alice@example.test")
            password_file.write_text(GATE_PASSWORD + "\n")
            directory.reload()
            return refused, await directory.lookup("alice@example.test")
        finally:
            directory.close()
    assert asyncio.run(run()) == (Lookup.TEMPFAIL, Lookup.VALID)


def test_a_wrong_base_tempfails_rather_than_calling_everyone_unknown(slapd, password_file):
    settings = settings_for(slapd.url, password_file, base="dc=nonexistent,dc=test")
    answers, _ = lookups(settings, ["alice@example.test"])
    assert answers == [Lookup.TEMPFAIL]


def test_concurrent_lookups_share_the_pool(slapd, password_file):
    async def run():
        directory = LdapRecipientDirectory(settings_for(slapd.url, password_file))
        try:
            addresses = [f"{p.uid}@example.test" for p in PEOPLE[:2]] * 10
            addresses += [f"nobody{i}@example.test" for i in range(20)]
            return await asyncio.gather(*(directory.lookup(a) for a in addresses))
        finally:
            directory.close()
    assert asyncio.run(run()) == [Lookup.VALID] * 20 + [Lookup.UNKNOWN] * 20


def test_close_lets_lookups_in_flight_finish_and_tempfails_later_ones(slapd, password_file):
    async def run():
        directory = LdapRecipientDirectory(settings_for(slapd.url, password_file))
        in_flight = [asyncio.create_task(directory.lookup(f"u{i}@example.test"))
                     for i in range(6)]
        await asyncio.sleep(0)  # each has handed its search to the pool
        directory.close()
        return await asyncio.gather(*in_flight), await directory.lookup("alice@example.test")
    in_flight, after_close = asyncio.run(run())
    assert in_flight == [Lookup.UNKNOWN] * 6
    assert after_close == Lookup.TEMPFAIL
