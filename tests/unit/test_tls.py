"""The STARTTLS context: a configured pair, or a self-signed one made once."""

import ssl

import pytest
from portcullis.config import ConfigError, Tls, check, loads
from portcullis.tls import server_context


def test_self_signed_pair_is_made_once_and_reused(tmp_path):
    settings = Tls(generated_dir=str(tmp_path / "tls"))
    assert isinstance(server_context(settings, "mx.example.test"), ssl.SSLContext)
    key = tmp_path / "tls" / "selfsigned.key"
    made = key.stat().st_mtime_ns
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    server_context(settings, "mx.example.test")
    assert key.stat().st_mtime_ns == made


def test_configured_pair_is_used(tmp_path):
    server_context(Tls(generated_dir=str(tmp_path)), "mx.example.test")
    settings = Tls(cert_file=str(tmp_path / "selfsigned.crt"),
                   key_file=str(tmp_path / "selfsigned.key"), generated_dir=str(tmp_path / "x"))
    assert server_context(settings, "other.example.test") is not None
    assert not (tmp_path / "x").exists()  # nothing generated


def test_bad_pair_is_a_clear_config_error(tmp_path):
    (tmp_path / "cert.pem").write_text("not a certificate")
    (tmp_path / "recipients").write_text("")
    base = (f"relay_domains: [example.org]\nbackend: {{servers: ['127.0.0.1:25']}}\n"
            f"reputation: {{store: memory}}\nrecipients: {{file: {tmp_path}/recipients}}\n")
    with pytest.raises(ConfigError, match="line 5: key 'tls.cert_file': .* not a PEM certificate"):
        check(loads(base + f"tls: {{cert_file: {tmp_path}/cert.pem, key_file: {tmp_path}/cert.pem}}\n"))
    with pytest.raises(ConfigError, match="line 5: key 'tls.key_file': give both .* or neither"):
        loads(base + f"tls: {{cert_file: {tmp_path}/cert.pem}}\n")


def test_disabled_tls_offers_nothing(tmp_path):
    assert server_context(Tls(enabled=False), "mx") is None
