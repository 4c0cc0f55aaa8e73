"""Logs and metrics an admin can use, and the shipped monitoring (issue 10).

JSON log lines and their journald priority, bounded refusal logging, every counter
series present from the start, histograms shipped from workers as bucket counts, the
certificate expiry; the Prometheus rules pass `promtool check rules` and their own
`promtool test rules`, and the rules and the Grafana dashboard use only metric names
the gate exports.
"""

import io
import json
import logging
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from portcullis import config, logs, metrics, tls
from portcullis.admission import ConnectionTable
from portcullis.policy.dha import DhaEngine
from portcullis.policy.reputation import open_store
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

TOP = Path(__file__).resolve().parents[2]
SOURCE = TOP / "appliance" / "portcullis"
PROMETHEUS = TOP / "etc" / "prometheus"
DASHBOARD = TOP / "etc" / "grafana" / "portcullis.json"

# Where reason labels are given: admission, the session and its relay, the SMTP core, policy.
DECIDERS = [SOURCE / name for name in ("admission.py", "gate.py", "session.py", "relay.py")]
DECIDERS += sorted((SOURCE / "smtp").glob("*.py"))
DECIDERS += [SOURCE / "policy" / f"{name}.py"
             for name in ("chain", "dha", "score", "dns_checks", "helo", "rates", "greylist")]
# Upper-case literals there that are not reason labels.
NOT_LABELS = {
    "AAAA", "PTR",  # DNS record types
    "BODY", "DATA", "EHLO", "EXPN", "FROM", "HELO", "HELP", "MAIL", "NOOP", "QUIT", "RCPT",
    "RSET", "STARTTLS", "VRFY", "PIPELINING", "ENHANCEDSTATUSCODES",  # SMTP words
    "BEGIN", "NEEDS_REPLY", "NEED_DATA", "PAUSED",  # the SMTP core's states and sentinels
}


def settings(extra: str = "") -> config.Config:
    return config.loads("relay_domains: [example.test]\nbackend: {servers: ['127.0.0.1:25']}\n"
                        "reputation: {store: memory}\n" + extra)


def scrape(registry: metrics.Registry) -> dict[str, float]:
    """Every sample of a registry, as 'name{labels}' -> value."""
    samples = {}
    for family in text_string_to_metric_families(generate_latest(registry.registry).decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


# --- logs --------------------------------------------------------------------


def record(level: int = logging.INFO, message: str = "hello %s", args=("world",), **extra):
    made = logging.LogRecord("portcullis.test", level, __file__, 1, message, args, None)
    made.__dict__.update(extra)
    return made


def test_every_record_is_one_json_object_with_the_base_fields():
    line = logs.JsonFormatter("worker-3").format(
        record(**logs.fields(session="ab-1", client="192.0.2.1", labels={"X": 1})))
    assert "\n" not in line
    parsed = json.loads(line)
    assert list(parsed)[:5] == ["time", "level", "process", "logger", "message"]
    assert parsed["process"] == "worker-3" and parsed["level"] == "info"
    assert parsed["message"] == "hello world" and parsed["logger"] == "portcullis.test"
    assert parsed["session"] == "ab-1" and parsed["labels"] == {"X": 1}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", parsed["time"])


def test_an_exception_stays_inside_the_json_line():
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        failed = record(logging.ERROR, "failed", (), exc_info=sys.exc_info())
    parsed = json.loads(logs.JsonFormatter("gate").format(failed))
    assert parsed["level"] == "error" and "ValueError: boom" in parsed["exception"]


def test_journald_gets_the_priority_and_the_bare_json(tmp_path, monkeypatch):
    path = str(tmp_path / "journal.socket")
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(path)
    monkeypatch.setattr(logs, "JOURNAL_SOCKET", path)
    handler = logs.JournalHandler(2)
    handler.setFormatter(logs.JsonFormatter("gate"))
    handler.emit(record(logging.WARNING, "careful", ()))
    fields = dict(line.split("=", 1) for line in journal.recv(65536).decode().splitlines())
    assert fields["PRIORITY"] == "4" and fields["SYSLOG_IDENTIFIER"] == "portcullis"
    assert json.loads(fields["MESSAGE"])["message"] == "careful"
    assert [logs.priority(level) for level in (10, 20, 30, 40, 50)] == [7, 6, 4, 3, 2]


def test_without_journald_the_line_goes_to_stderr(tmp_path, monkeypatch):
    monkeypatch.setattr(logs, "JOURNAL_SOCKET", str(tmp_path / "none"))
    out = tmp_path / "stderr"
    with open(out, "wb") as stream:
        handler = logs.JournalHandler(stream.fileno())  # journald gone: falls back
        handler.setFormatter(logs.JsonFormatter("gate"))
        handler.emit(record())
    assert json.loads(out.read_text())["message"] == "hello world"


def test_journald_is_used_only_when_stderr_is_the_journal_stream(tmp_path, monkeypatch):
    with open(tmp_path / "stream", "w") as stream:
        monkeypatch.setattr(sys, "stderr", stream)
        status = Path(stream.name).stat()
        monkeypatch.setenv("JOURNAL_STREAM", f"{status.st_dev}:{status.st_ino}")
        assert logs.stderr_is_journal()
        monkeypatch.setenv("JOURNAL_STREAM", f"{status.st_dev}:{status.st_ino + 1}")
        assert not logs.stderr_is_journal()
        monkeypatch.setattr(sys, "stderr", io.StringIO())
        assert not logs.stderr_is_journal()


def test_a_flood_of_refusals_logs_a_burst_then_a_summary(caplog):
    now = [0.0]
    limited = logs.RateLimitedLines(logging.getLogger("portcullis.test"), rate=1, burst=3,
                                    interval=10, clock=lambda: now[0])
    caplog.set_level(logging.INFO, "portcullis.test")
    for _ in range(100):
        limited.info("CONN_RATE", "refused", labels={"CONN_RATE": 1})
    limited.info("PREGREET", "refused", labels={"PREGREET": 1})
    assert len(caplog.records) == 4  # a burst of 3, and another label's own bucket
    now[0] = 5
    limited.flush()
    assert len(caplog.records) == 4  # summaries at most every 10 s
    now[0] = 10
    limited.info("CONN_RATE", "refused", labels={"CONN_RATE": 1})  # refilled
    limited.flush()
    summary = caplog.records[-1]
    assert summary.levelno == logging.WARNING and summary.fields == {"labels": {"CONN_RATE": 97}}
    limited.flush(force=True)
    assert len(caplog.records) == 6  # nothing left to sum up


# --- metrics -----------------------------------------------------------------


def label_literals() -> set[str]:
    """The upper-case literals of the modules that decide (and label) what happens."""
    found = set()
    for path in DECIDERS:
        found |= set(re.findall(r'"([A-Z][A-Z0-9_]{2,})"', path.read_text()))
    return found - NOT_LABELS


def test_reasons_list_every_label_in_the_code():
    assert set(metrics.REASONS) == label_literals()


def test_eviction_tables_are_the_ones_the_code_counts():
    configured = settings()
    tables = set(ConnectionTable(configured).take_evictions())
    tables |= set(DhaEngine(configured, open_store(configured), None).take_evictions())
    assert tables == set(metrics.EVICTION_TABLES)


def test_every_series_exists_from_the_start_and_none_is_created():
    samples = scrape(metrics.Registry())
    for label in metrics.REASONS:
        assert samples[f'portcullis_decisions_total{{reason="{label}"}}'] == 0
    for table in metrics.EVICTION_TABLES:
        assert samples[f'portcullis_state_evictions_total{{table="{table}"}}'] == 0
    assert samples["portcullis_worker_restarts_total"] == 0
    assert samples[f'portcullis_build_info{{version="{metrics.__version__}"}}'] == 1
    assert samples["process_resident_memory_bytes"] > 0
    assert not [name for name in samples if "_created" in name]
    for spec in metrics.HISTOGRAMS.values():
        assert samples[spec.name + "_count"] == 0


def test_histograms_shipped_as_bucket_counts_add_up_in_the_gate():
    registry = metrics.Registry()
    for _ in range(2):  # two workers, or two reports of one
        tally = metrics.Tally()
        for seconds in (0.003, 0.05, 0.05, 1000):
            tally.observe(metrics.BACKEND_REPLY, seconds)
        tally.add(metrics.SESSIONS)
        registry.merge(tally.drain())
        assert tally.drain() == {}
    samples = scrape(registry)
    name = metrics.HISTOGRAMS[metrics.BACKEND_REPLY].name
    assert samples[name + '_bucket{le="0.0025"}'] == 0
    assert samples[name + '_bucket{le="0.005"}'] == 2
    assert samples[name + '_bucket{le="0.05"}'] == 6
    assert samples[name + '_bucket{le="120.0"}'] == 6
    assert samples[name + '_bucket{le="+Inf"}'] == samples[name + "_count"] == 8
    assert samples[name + "_sum"] == pytest.approx(2 * 1000.103)
    assert samples["portcullis_sessions_total"] == 2


def test_certificate_expiry_is_the_presented_certificate(tmp_path):
    settings = config.Tls(generated_dir=str(tmp_path))
    path, expiry = tls.certificate_expiry(settings, "mx.example.test")
    assert path == str(tmp_path / "selfsigned.crt")
    assert expiry == pytest.approx(time.time() + 3650 * 86400, abs=2 * 86400)
    assert tls.certificate_expiry(config.Tls(enabled=False), "mx") is None
    registry = metrics.Registry()
    registry.certificate((path, expiry))
    name = "portcullis_tls_certificate_expiry_timestamp_seconds"
    assert scrape(registry)[f'{name}{{file="{path}"}}'] == expiry


# --- shipped monitoring -----------------------------------------------------

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool missing (Debian package prometheus)")


def promtool(*args: str) -> None:
    result = subprocess.run(["promtool", *args], check=False, cwd=PROMETHEUS,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_rules_and_scrape_config_pass_promtool():
    promtool("check", "rules", "portcullis.rules.yml")
    promtool("check", "config", "prometheus.example.yml")


@needs_promtool
def test_alerts_fire_when_they_should():
    promtool("test", "rules", "portcullis.rules.test.yml")


def exported_names() -> set[str]:
    text = generate_latest(metrics.Registry().registry).decode()
    families = list(text_string_to_metric_families(text))  # a labelled gauge may be empty
    return ({family.name for family in families}
            | {sample.name for family in families for sample in family.samples})


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    expr = re.sub(r'"[^"]*"|\{[^}]*\}|\[[^\]]*\]', "", expr)  # strings, matchers, ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set(re.findall(r"\b[a-zA-Z_:][\w:]*\b(?!\s*\()", expr))
    return names - {"and", "or", "unless", "bool", "offset"}


def test_rules_and_dashboard_use_only_metrics_the_gate_exports():
    exported = exported_names() | {"up"}  # up: Prometheus's own, per target
    rules = yaml.safe_load((PROMETHEUS / "portcullis.rules.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    dashboard = json.loads(DASHBOARD.read_text())
    exprs += [target["expr"] for panel in dashboard["panels"]
              for target in panel.get("targets", ())]
    assert len(exprs) > 30
    for expr in exprs:
        names = metric_names(expr)
        assert names and names <= exported, (expr, names - exported)
