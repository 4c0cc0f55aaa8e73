"""Shared fixtures: one private Postfix backend per test session (tests/support/postfix.py)."""

import pytest

from tests.support.postfix import PostfixBackend


@pytest.fixture(scope="session")
def postfix_backend():
    """A running Postfix on 127.0.0.1:<free port> delivering example.test into Maildirs.

    Users: alice, bob, carol. Every test that uses it starts with it running, in
    normal mode, with empty mailboxes and an empty queue.
    """
    with PostfixBackend() as backend:
        yield backend


@pytest.fixture(autouse=True)
def _reset_postfix_backend(request):
    if "postfix_backend" in request.fixturenames:
        request.getfixturevalue("postfix_backend").reset()
