"""The staged directory-harvest engine, driven by an injected clock (no sleeps)."""

import ipaddress

import pytest
from portcullis import config
from portcullis.policy.dha import CLOSING, TRY_LATER, DhaEngine
from portcullis.policy.reputation import DATABASE_NAME, MemoryStore, SqliteStore
from portcullis.policy.score import ConnectionScore, Signal, Stage

T0 = 1_800_000_000.0
ATTACKER = "192.0.2.10"


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Harness:
    """An engine with a memory store, a clock, and a record of firewall requests."""

    def __init__(self, settings: config.Config | None = None, open_store=None):
        self.settings = settings or config.Config()
        self.clock = Clock()
        self.pushed: list[tuple[str, int]] = []
        if open_store is None:
            self.store = MemoryStore(self.settings.dha.window)
        else:
            self.store = open_store(self.clock)
        self.engine = DhaEngine(self.settings, self.store,
                                on_ban=lambda a, s: self.pushed.append((a, s)), clock=self.clock)

    def score(self) -> ConnectionScore:
        return ConnectionScore(self.settings.score)

    def misses(self, address: str, count: int, score: ConnectionScore | None = None) -> list:
        """RCPTs that turn out not to exist, each in a session of its own unless a score
        (one session's) is given. Returns every verdict the session got."""
        verdicts = []
        for _ in range(count):
            session = score or self.score()
            before = self.engine.before_rcpt(address, session)
            verdicts.append(before)
            if before.reply is None:  # the session consults the directory: not found
                verdicts.append(self.engine.invalid_recipient(address, session))
        return verdicts

def test_a_clean_client_passes_everything():
    h = Harness()
    assert h.engine.check_connect(ATTACKER).stage is Stage.PASS
    verdict = h.engine.before_rcpt(ATTACKER, h.score())
    assert (verdict.stage, verdict.delay, verdict.reply, verdict.label) == (
        Stage.PASS, 0.0, None, None)


def test_invalid_recipients_walk_through_the_stages_across_sessions():
    h = Harness()
    # Each miss in its own session: the counts live in the store, not in the session.
    stages, delays, labels = [], [], []
    for _ in range(9):
        verdict = h.engine.before_rcpt(ATTACKER, h.score())
        stages.append(verdict.stage)
        delays.append(verdict.delay)
        labels.append(verdict.label)
        if verdict.reply is None:
            h.engine.invalid_recipient(ATTACKER, h.score())
        h.clock.now += 1
    assert stages[:3] == [Stage.PASS] * 3
    assert stages[3:5] == [Stage.TARPIT] * 2
    assert labels[3:5] == ["DHA_TARPIT"] * 2
    assert delays[3:5] == [1.0, 2.0]  # the tarpit grows with each miss
    assert stages[5:] == [Stage.TEMPFAIL] * 4
    assert set(labels[5:]) == {"DHA_SUSPECT"}


def test_the_tarpit_delay_is_capped():
    settings = config.Config()
    settings.dha.suspect_after = settings.dha.ban_after = 50
    h = Harness(settings)
    h.misses(ATTACKER, 20)
    assert h.engine.before_rcpt(ATTACKER, h.score()).delay == settings.dha.tarpit_max


def test_a_suspect_gets_one_reply_and_one_delay_whatever_the_address():
    h = Harness()
    h.misses(ATTACKER, 5)
    score = h.score()
    answers = {(v.stage, v.reply, v.delay, v.label)
               for v in (h.engine.before_rcpt(ATTACKER, score) for _ in range(4))}
    assert answers == {(Stage.TEMPFAIL, TRY_LATER, 5.0, "DHA_SUSPECT")}
    assert str(TRY_LATER).startswith("450 4.7.1")


def test_a_suspect_is_banned_after_the_same_number_of_rcpts_valid_or_not():
    # From SUSPECT on, the session never consults the directory: the engine counts every
    # RCPT as a probe, so the moment of the ban cannot reveal which addresses exist.
    h = Harness()
    h.misses(ATTACKER, 5)  # 5 misses: suspect
    score = h.score()
    verdicts = [h.engine.before_rcpt(ATTACKER, score) for _ in range(5)]
    assert [v.stage for v in verdicts] == [Stage.TEMPFAIL] * 4 + [Stage.BAN]
    ban = verdicts[-1]
    assert (ban.label, ban.reply, ban.delay, ban.disconnect) == ("DHA_BAN", CLOSING, 5.0, True)
    assert h.pushed == [(ATTACKER, 3600)]


def test_ten_misses_in_ten_minutes_ban_for_an_hour():
    h = Harness()
    h.settings.dha.suspect_after = 10  # no suspect stage: the tenth miss itself bans
    verdicts = h.misses(ATTACKER, 10)
    assert verdicts[-1].stage is Stage.BAN
    assert verdicts[-1].reply == CLOSING  # instead of the 550 the address would get
    assert h.pushed == [(ATTACKER, 3600)]

    h.clock.now += 3599
    banned = h.engine.check_connect(ATTACKER)
    assert (banned.stage, banned.label, banned.reply) == (Stage.BAN, "BANNED", CLOSING)
    h.clock.now += 1
    assert h.engine.check_connect(ATTACKER).stage is Stage.PASS


def test_within_one_session_the_score_and_the_counts_agree():
    h = Harness()
    verdicts = h.misses(ATTACKER, 10, score=h.score())
    assert verdicts[-1].stage is Stage.BAN
    assert verdicts[-1].label == "DHA_BAN"
    assert h.pushed == [(ATTACKER, 3600)]


def test_misses_older_than_the_window_are_forgotten():
    h = Harness()
    h.misses(ATTACKER, 4)
    h.clock.now += 601
    h.misses(ATTACKER, 4)
    assert h.engine.before_rcpt(ATTACKER, h.score()).stage is Stage.TARPIT
    assert h.pushed == []


def test_a_prefix_has_its_own_higher_thresholds():
    h = Harness()
    # 30 misses, two from each of 15 addresses in one /24: no address is past PASS.
    for host in range(15):
        for verdict in h.misses(f"192.0.2.{host}", 2)[:-1]:
            assert verdict.stage < Stage.BAN
    # The prefix reached prefix_ban_after (30): the last miss banned address and prefix.
    assert h.engine.check_connect("192.0.2.14").label == "BANNED"
    assert h.engine.check_connect("192.0.2.200").label == "BANNED"
    assert h.engine.check_connect("192.0.3.1").stage is Stage.PASS
    # A new address of the banned prefix is sent to the firewall when it shows up.
    assert h.pushed == [("192.0.2.14", 3600), ("192.0.2.200", 3600)]


def test_ipv6_clients_are_grouped_by_their_prefix():
    # Clients by address (/128), so that the /64 prefix's own thresholds show.
    h = Harness(config.Config(limits=config.Limits(ipv6_client_prefix=128)))
    for host in range(10):
        h.misses(f"2001:db8:1:2::{host:x}", 1)
    # 10 misses in the /64, one per address: the prefix tarpits, no address alone would.
    verdict = h.engine.before_rcpt("2001:db8:1:2::ffff", h.score())
    assert (verdict.stage, verdict.label) == (Stage.TARPIT, "DHA_TARPIT")
    assert h.engine.before_rcpt("2001:db8:1:3::1", h.score()).stage is Stage.PASS


def test_an_ipv4_mapped_address_counts_as_its_ipv4_address():
    h = Harness()
    h.misses("::ffff:192.0.2.10", 3)
    assert h.engine.before_rcpt(ATTACKER, h.score()).stage is Stage.TARPIT


def test_an_allowlisted_client_is_never_slowed_or_banned():
    settings = config.Config(allowlist=[ipaddress.ip_network("192.0.2.0/24")])
    h = Harness(settings)
    verdicts = h.misses(ATTACKER, 30)
    assert {v.stage for v in verdicts} == {Stage.PASS}
    assert h.engine.check_connect(ATTACKER).stage is Stage.PASS
    assert h.pushed == []


def test_a_score_that_reaches_ban_bans_with_its_own_label():
    h = Harness()
    score = h.score()
    score.add(Signal.PREGREET)
    verdict = h.engine.after_signal(ATTACKER, score)
    assert (verdict.stage, verdict.label, verdict.disconnect) == (
        Stage.TEMPFAIL, "SCORE_TEMPFAIL", False)
    rcpt = h.engine.before_rcpt(ATTACKER, score)
    assert (rcpt.reply, rcpt.delay) == (TRY_LATER, 5.0)
    score.add(Signal.DNSBL)
    score.add(Signal.BAD_HELO)
    verdict = h.engine.after_signal(ATTACKER, score)
    assert (verdict.stage, verdict.label, verdict.reply) == (Stage.BAN, "SCORE_BAN", CLOSING)
    assert h.engine.check_connect(ATTACKER).label == "BANNED"
    assert h.pushed == [(ATTACKER, 3600)]


def test_score_tempfail_alone_does_not_count_rcpts_as_probes():
    h = Harness()
    score = h.score()
    score.add(Signal.PREGREET)
    for _ in range(20):
        assert h.engine.before_rcpt(ATTACKER, score).stage is Stage.TEMPFAIL
    assert h.engine.before_rcpt(ATTACKER, h.score()).stage is Stage.PASS


def test_the_score_tarpit_and_the_dha_tarpit_take_the_longer_delay():
    h = Harness()
    score = h.score()
    score.add(Signal.NO_REVERSE_DNS)
    score.add(Signal.BAD_HELO)
    first = h.engine.before_rcpt(ATTACKER, score)
    assert (first.stage, first.label, first.delay) == (Stage.TARPIT, "SCORE_TARPIT", 2.0)
    h.misses(ATTACKER, 4)
    second = h.engine.before_rcpt(ATTACKER, score)
    assert (second.label, second.delay) == ("DHA_TARPIT", 2.0)


def test_dha_can_be_disabled_while_the_score_still_works():
    h = Harness()
    h.settings.dha.enabled = False
    verdicts = h.misses(ATTACKER, 12, score=h.score())
    assert [v.label for v in verdicts if v.label][:3] == ["SCORE_TARPIT"] * 3
    assert verdicts[-1].label == "SCORE_TEMPFAIL"
    assert h.pushed == []


def test_a_ban_in_force_is_not_extended_and_not_pushed_twice_at_once():
    h = Harness()
    h.engine.ban(ATTACKER, "ADMIN")
    h.clock.now += 10
    h.engine.ban(ATTACKER, "ADMIN")
    h.engine.check_connect(ATTACKER)
    assert h.pushed == [(ATTACKER, 3600)]
    assert h.store.ban_of(ATTACKER, h.clock.now).until == T0 + 3600
    # Still reaching the gate a minute later: the set lost it; send the rest again.
    h.clock.now = T0 + 70
    assert h.engine.check_connect(ATTACKER).label == "BANNED"
    assert h.pushed[-1] == (ATTACKER, 3530)


def test_bans_survive_a_restart_and_are_sent_to_the_firewall_again(tmp_path):
    settings = config.Config(state_dir=str(tmp_path))
    path = str(tmp_path / DATABASE_NAME)

    def open_store(clock):
        return SqliteStore(path, settings.dha.window, clock=clock)

    before = Harness(settings, open_store)
    before.settings.dha.suspect_after = 10
    before.misses(ATTACKER, 10)
    before.store.close()

    after = Harness(settings, open_store)
    try:
        after.clock.now = T0 + 600
        assert after.engine.restore_bans() == 1
        assert after.pushed == [(ATTACKER, 3000)]
        assert after.engine.check_connect(ATTACKER).label == "BANNED"
    finally:
        after.store.close()


def test_out_of_order_thresholds_are_a_config_error():
    with pytest.raises(config.ConfigError,
                       match=r"portcullis.yaml line 3: key 'dha.prefix_ban_after': must not be "
                             r"below 'dha.prefix_suspect_after' \(40\), got 30"):
        config.loads("relay_domains: [example.org]\nbackend: {servers: ['127.0.0.1:25']}\n"
                     "dha: {prefix_suspect_after: 40}\n", "portcullis.yaml")


def test_a_peer_that_is_not_an_ip_address_is_refused_clearly():
    h = Harness()
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        h.engine.check_connect("not-an-address")
