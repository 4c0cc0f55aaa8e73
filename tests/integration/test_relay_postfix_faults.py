"""The relay contract against a real Postfix backend that fails the way Postfix fails.

- A full queue filesystem: Postfix's smtpd answers MAIL with "452 4.3.1 Insufficient
  system storage" (and, pipelined, the RCPT after it with "503 5.5.1 need MAIL"). The
  client must see 4xx for every recipient, never the 5xx.
- Postfix stopped and started again under a stream of messages: no reply is ever 5xx,
  and every message the client was told 250 for is delivered to every recipient that
  was told 250 at RCPT.
"""

from __future__ import annotations

import os
import random
import re
import smtplib
import subprocess
import threading
import time
import uuid

import pytest

from tests.support.gate import GateProcess
from tests.support.postfix import PostfixBackend

USERS = ("alice", "bob", "carol")
SUBJECT = re.compile(rb"^Subject: (\S+)\r?$", re.MULTILINE)


@pytest.fixture
def gate(postfix_backend, tmp_path):
    # Allowlisted, so that the per-IP connection rate never refuses the message stream.
    with GateProcess(tmp_path, f"127.0.0.1:{postfix_backend.port}",
                     allowlist=["127.0.0.0/8"]) as running:
        yield running


# --- main.cf changes that the fixture's reset() does not undo ---------------------------

def explicit_setting(backend: PostfixBackend, name: str) -> str | None:
    """name's value if main.cf sets it explicitly, None if it is left at its default."""
    output = subprocess.run(["postconf", "-c", str(backend.config_dir), "-n", name],
                            check=True, capture_output=True, text=True, timeout=30).stdout
    if not output.strip():
        return None
    return output.partition("=")[2].strip()


def restore_settings(backend: PostfixBackend, saved: dict[str, str | None]) -> None:
    """Put main.cf back as it was (explicit values, or no line at all) and reload."""
    explicit = {name: value for name, value in saved.items() if value is not None}
    backend.postconf(explicit)
    removed = [name for name, value in saved.items() if value is None]
    if removed:
        subprocess.run(["postconf", "-c", str(backend.config_dir), "-X", *removed],
                       check=True, capture_output=True, timeout=30)
        aged = time.time() - 10  # as postconf() does: no 2 s pause in postfix reload
        os.utime(backend.config_dir / "main.cf", (aged, aged))
    for name, value in saved.items():
        assert explicit_setting(backend, name) == value, f"{name} not restored"
    if backend.running:
        backend.reload()


# --- test 1: the queue filesystem is full -------------------------------------------------

def test_full_queue_filesystem_gives_4xx_for_every_recipient(gate, postfix_backend):
    free = os.statvfs(postfix_backend.queue_dir)
    free_bytes = free.f_bavail * free.f_frsize
    saved = {name: explicit_setting(postfix_backend, name)
             for name in ("queue_minfree", "notify_classes")}
    try:
        # More free space required than there is; no "resource" notice to the backend's
        # postmaster, which would sit in the queue (this instance sends no outbound mail).
        postfix_backend.postconf({"queue_minfree": str(2 * free_bytes + 10**9),
                                  "notify_classes": "software"})
        postfix_backend.reload()

        # Precondition: Postfix itself says 452 at MAIL, and 5xx to the RCPT after it.
        with smtplib.SMTP(postfix_backend.host, postfix_backend.port,
                          local_hostname="client.test", timeout=10) as direct:
            direct.ehlo()
            mail = direct.mail("s@outside.test")
            rcpt = direct.rcpt("alice@example.test")
        assert mail == (452, b"4.3.1 Insufficient system storage"), mail
        assert rcpt[0] == 503, rcpt  # what a naive relay would pass on as permanent

        with smtplib.SMTP("127.0.0.1", gate.port, local_hostname="client.test",
                          timeout=30) as client:
            client.ehlo()
            assert client.mail("s@outside.test")[0] == 250
            replies = [client.rcpt(f"{user}@example.test")
                       for user in ("alice", "bob", "alice")]
            client.rset()
        assert all(400 <= code < 500 for code, _ in replies), (replies, gate.log_text()[-3000:])
        assert replies[0] == (452, b"4.3.1 Insufficient system storage"), replies
    finally:
        restore_settings(postfix_backend, saved)

    with smtplib.SMTP("127.0.0.1", gate.port, local_hostname="client.test",
                      timeout=30) as client:
        refused = client.sendmail("s@outside.test", ["alice@example.test"],
                                  b"Subject: after the disk was freed\r\n\r\nbody\r\n")
    assert refused == {}
    delivered = postfix_backend.wait_for("alice")
    assert len(delivered) == 1 and b"Subject: after the disk was freed" in delivered[0]
    postfix_backend.assert_no_bounce(settle=2)


# --- test 2: Postfix stopped and started under a stream of messages --------------------

MESSAGES = 60
STOP_AFTER, START_AFTER = 20, 40  # stop() mid-DATA of message #20; start() after #40 is sent
PACE = 0.02  # seconds between two commands of a session


def send_one(port: int, index: int, tag: str, recipients: list[str],
             mid_data=lambda: None) -> dict:
    """One session, one message; every reply the client saw, and when.

    The client pauses between its commands and inside DATA (where it calls mid_data()),
    so that the backend's outage finds sessions with an open backend transaction.
    """
    subject = f"fault-{tag}-{index:03d}"
    record = {"index": index, "subject": subject, "codes": [], "rcpts": {}, "final": None,
              "error": None, "started": time.monotonic()}
    try:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test",
                          timeout=20) as client:
            record["codes"].append(client.ehlo()[0])
            code, text = client.mail("s@outside.test")
            record["codes"].append(code)
            if code == 250:
                for address in recipients:
                    time.sleep(PACE)
                    code, text = client.rcpt(address)
                    record["codes"].append(code)
                    record["rcpts"][address] = (code, text)
            # As a real client: DATA only when some recipient was accepted.
            if any(code == 250 for code, _ in record["rcpts"].values()):
                time.sleep(PACE)
                code, text = client.docmd("DATA")
                record["codes"].append(code)
                if code == 354:
                    client.send(f"Subject: {subject}\r\nMessage-ID: <{subject}@client.test>\r\n"
                                f"\r\nmessage {index} of the stream,\r\n".encode())
                    time.sleep(PACE)
                    mid_data()
                    client.send(b"second half\r\n.\r\n")
                    code, text = client.getreply()
                    record["codes"].append(code)
                    record["final"] = (code, text)
    except (smtplib.SMTPException, OSError) as e:
        record["error"] = repr(e)  # the client retries: not accepted, not an error
    record["ended"] = time.monotonic()
    return record


def delivered_subjects(backend: PostfixBackend) -> dict[str, set[bytes]]:
    return {user: {match.group(1) for message in backend.messages(user)
                   for match in SUBJECT.finditer(message.split(b"\n\n", 1)[0])}
            for user in USERS}


def test_postfix_stopped_and_restarted_under_a_message_stream(gate, postfix_backend):
    tag = uuid.uuid4().hex[:8]
    chooser = random.Random(tag)
    plans = [[f"{user}@example.test" for user in chooser.sample(USERS, chooser.randint(1, 3))]
             for _ in range(MESSAGES)]
    records: list[dict] = []
    stop_sending = threading.Event()
    in_data, resume = threading.Event(), threading.Event()

    def stop_here() -> None:
        """Message STOP_AFTER, halfway through DATA: let the main thread stop Postfix."""
        in_data.set()
        resume.wait(timeout=30)

    def stream() -> None:
        for index, recipients in enumerate(plans):
            if stop_sending.is_set():
                return
            hook = stop_here if index == STOP_AFTER else (lambda: None)
            records.append(send_one(gate.port, index, tag, recipients, hook))
            time.sleep(PACE)

    def wait_sent(count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(records) < count and sender.is_alive():
            assert time.monotonic() < deadline, f"only {len(records)} messages sent"
            time.sleep(0.01)

    sender = threading.Thread(target=stream, name="message-stream", daemon=True)
    sender.start()
    try:
        assert in_data.wait(timeout=60), f"message {STOP_AFTER} never reached DATA"
        stopping = time.monotonic()
        postfix_backend.stop()
        stopped = time.monotonic()
        resume.set()
        wait_sent(START_AFTER)
        starting = time.monotonic()
        postfix_backend.start()
        started = time.monotonic()
        sender.join(timeout=60)
        assert not sender.is_alive(), "the message stream did not finish in 60 s"
    finally:
        stop_sending.set()
        resume.set()
        sender.join(timeout=30)
        postfix_backend.start()
    assert len(records) == MESSAGES

    def describe(record: dict) -> str:
        return (f"#{record['index']} rcpts={record['rcpts']} final={record['final']} "
                f"error={record['error']} at {record['started'] - stopping:+.2f}s "
                f"(stop {stopped - stopping:.2f}s, start {starting - stopping:.2f}"
                f"..{started - stopping:.2f}s)")

    permanent = [describe(r) for r in records if any(code >= 500 for code in r["codes"])]
    assert not permanent, "5xx during a transient backend outage:\n" + "\n".join(permanent)

    accepted = [r for r in records if r["final"] and r["final"][0] == 250]
    tempfailed = [r for r in records if r not in accepted]
    while_down = [r for r in records if stopped <= r["started"] and r["ended"] <= starting]
    assert not [r for r in while_down if r in accepted], "250 while Postfix was stopped"
    assert any(any(400 <= code < 500 for code in r["codes"]) for r in while_down), \
        "no message got 4xx while Postfix was stopped: the outage was not exercised"
    assert [r for r in accepted if r["started"] >= started], \
        "no message got 250 after Postfix came back"
    # The message Postfix died under, mid-DATA: 4xx, and never delivered, not even in part.
    cut = records[STOP_AFTER]
    assert cut["final"] and 400 <= cut["final"][0] < 500, describe(cut)
    for record in tempfailed:
        assert record["error"] or any(400 <= code < 500 for code in record["codes"]), \
            describe(record)

    # Every 250 must be a delivery, to every recipient that was told 250 at RCPT.
    expected = {(user.split("@")[0], r["subject"].encode()) for r in accepted
                for user, (code, _) in r["rcpts"].items() if code == 250}
    deadline = time.monotonic() + 30
    while True:
        have = delivered_subjects(postfix_backend)
        missing = {(user, subject) for user, subject in expected if subject not in have[user]}
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    lost = sorted(missing)
    assert not any(cut["subject"].encode() in subjects for subjects in have.values()), \
        f"the message cut off mid-DATA was delivered: {describe(cut)}"
    by_subject = {r["subject"]: r for r in records}
    assert not lost, ("told 250, never delivered:\n" + "\n".join(
        f"{user}: {describe(by_subject[subject.decode()])}" for user, subject in lost)
        + f"\nbackend queue:\n{postfix_backend.queue_listing()}")

    print(f"\n{MESSAGES} messages through a Postfix stop/start: accepted={len(accepted)} "
          f"tempfailed={len(tempfailed)} (connection errors="
          f"{sum(1 for r in tempfailed if r['error'])}) lost=0; "
          f"#{STOP_AFTER} cut mid-DATA got {cut['final'][0]} {cut['final'][1].decode()}; "
          f"stop took {stopped - stopping:.2f}s, start {started - starting:.2f}s")
