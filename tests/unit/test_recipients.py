"""The static recipient list."""

import os

import pytest
from portcullis.policy import Lookup
from portcullis.policy.recipients import RecipientListError, StaticRecipients, parse_recipient_list


def test_addresses_and_domains(tmp_path):
    path = tmp_path / "recipients"
    path.write_text("# staff\nAlice@Example.test\n@catchall.test  # every address\n\n")
    directory = StaticRecipients(str(path))
    assert directory.lookup_now("alice@example.TEST") is Lookup.VALID
    assert directory.lookup_now("bob@example.test") is Lookup.UNKNOWN
    assert directory.lookup_now("anyone@catchall.test") is Lookup.VALID


def test_reload_when_file_changes(tmp_path):
    path = tmp_path / "recipients"
    path.write_text("alice@example.test\n")
    directory = StaticRecipients(str(path))
    directory.CHECK_INTERVAL = 0
    path.write_text("bob@example.test\n")
    os.utime(path, ns=(1, 1))
    assert directory.lookup_now("bob@example.test") is Lookup.VALID
    assert directory.lookup_now("alice@example.test") is Lookup.UNKNOWN


def test_bad_file_keeps_previous_list(tmp_path):
    path = tmp_path / "recipients"
    path.write_text("alice@example.test\n")
    directory = StaticRecipients(str(path))
    path.write_text("not an address\n")
    directory.reload()
    assert directory.lookup_now("alice@example.test") is Lookup.VALID


def test_unreadable_at_start_tempfails_never_unknown(tmp_path):
    directory = StaticRecipients(str(tmp_path / "missing"))
    assert directory.lookup_now("alice@example.test") is Lookup.TEMPFAIL


def test_parse_errors_name_the_line():
    with pytest.raises(RecipientListError, match="line 2: 'two words@x' "):
        parse_recipient_list("a@b.test\ntwo words@x\n", "list")
