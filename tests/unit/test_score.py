"""The per-connection reputation score: weights, stages, thresholds."""

import pytest
from portcullis import config
from portcullis.policy.score import ConnectionScore, Signal, Stage


def make_score(**overrides) -> ConnectionScore:
    settings = config.Score(**overrides)
    return ConnectionScore(settings)


def test_a_new_connection_passes_without_delay():
    score = make_score()
    assert score.stage is Stage.PASS
    assert score.label is None
    assert score.delay == 0.0


def test_each_signal_adds_its_configured_weight():
    score = make_score()
    score.add(Signal.NO_REVERSE_DNS)
    score.add(Signal.BAD_HELO)
    assert score.value == 6.0
    assert score.describe() == "6 no_reverse_dns bad_helo"


def test_weak_signals_together_only_tarpit():
    score = make_score()
    score.add(Signal.NO_REVERSE_DNS)
    assert score.stage is Stage.PASS
    assert score.add(Signal.BAD_HELO) is Stage.TARPIT
    assert score.label == "SCORE_TARPIT"
    assert score.delay == config.Score().tarpit_delay


def test_pregreet_alone_tempfails():
    score = make_score()
    assert score.add(Signal.PREGREET) is Stage.TEMPFAIL
    assert score.label == "SCORE_TEMPFAIL"


def test_two_strong_signals_and_one_invalid_recipient_ban():
    score = make_score()
    score.add(Signal.PREGREET)
    score.add(Signal.DNSBL)
    assert score.stage is Stage.TEMPFAIL
    assert score.add(Signal.INVALID_RECIPIENT) is Stage.BAN
    assert score.label == "SCORE_BAN"


def test_ten_invalid_recipients_in_one_session_ban_like_the_dha_default():
    score = make_score()
    stages = [score.add(Signal.INVALID_RECIPIENT) for _ in range(10)]
    assert stages.index(Stage.TARPIT) == 2  # the third miss
    assert stages.index(Stage.TEMPFAIL) == 4  # the fifth
    assert stages.index(Stage.BAN) == 9  # the tenth
    assert score.describe() == "20 invalid_recipient*10"


def test_an_explicit_weight_overrides_the_configured_one():
    score = make_score()
    score.add(Signal.DNSBL, weight=1.5)
    assert score.value == 1.5
    assert score.stage is Stage.PASS


def test_thresholds_are_configurable():
    score = make_score(tarpit=1, tempfail=2, ban=3, tarpit_delay=7.0)
    score.add(Signal.STRIKE, weight=1)
    assert (score.stage, score.delay) == (Stage.TARPIT, 7.0)
    score.add(Signal.STRIKE, weight=1)
    assert score.stage is Stage.TEMPFAIL
    score.add(Signal.STRIKE, weight=1)
    assert score.stage is Stage.BAN


def test_thresholds_out_of_order_are_a_config_error_naming_the_key():
    with pytest.raises(config.ConfigError, match=r"line 3: key 'score.ban': must not be below "
                                                 r"'score.tempfail' \(10\), got 8"):
        config.loads("relay_domains: [example.org]\nbackend: {servers: ['127.0.0.1:25']}\n"
                     "score: {ban: 8}\n", "/etc/portcullis/portcullis.yaml")


def test_weights_load_from_yaml_and_bad_values_name_the_line():
    text = """
relay_domains: [example.org]
backend: {servers: ["127.0.0.1:25"]}
score:
  ban: 30
  weights:
    dnsbl: 12
"""
    loaded = config.loads(text)
    assert loaded.score.ban == 30.0
    assert loaded.score.weights.dnsbl == 12.0
    assert loaded.score.weights.pregreet == 10.0
    with pytest.raises(config.ConfigError, match=r"line 7: key 'score.weights.dnsbl'"):
        config.loads(text.replace("dnsbl: 12", "dnsbl: -1"))
