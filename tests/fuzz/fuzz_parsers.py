"""Fuzz target: the parsers of what peers send. The client's command arguments (MAIL,
RCPT, HELO) and the backend's replies, read by the relay's ReplyReader.

Invariants: only the documented errors (SyntaxProblem, MalformedReply) are raised; a
recipient comes out in normal form with no routing in it; a reply has a code from
200 to 599.
"""

import sys

import atheris

with atheris.instrument_imports():
    from portcullis.smtp import commands
    from portcullis.upstream import MalformedReply, ReplyReader


def check_command(text: str) -> None:
    verb, argument = commands.split_command(text)
    assert verb == verb.upper()
    try:
        recipient = commands.parse_rcpt(argument, "example.test").address
    except commands.SyntaxProblem as problem:
        assert 500 <= problem.reply.code < 600
    else:
        local, _, domain = recipient.rpartition("@")
        assert domain == domain.lower() and not domain.endswith(".")
        assert not any(c in local for c in "%!") and "@" not in local.strip('"')
    for parse in (commands.parse_mail, commands.parse_helo):
        try:
            parse(argument)
        except commands.SyntaxProblem as problem:
            assert 500 <= problem.reply.code < 600


def check_replies(data: bytes, pieces: list[int]) -> None:
    reader = ReplyReader()
    start = 0
    for size in pieces + [len(data)]:
        reader.feed(data[start:start + size])
        start += size
        try:
            while (reply := reader.next_reply()) is not None:
                assert 200 <= reply.code <= 599
        except MalformedReply:
            return


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    text = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 600))
    if text.isascii():
        check_command(text)
    pieces = [fdp.ConsumeIntInRange(1, 200) for _ in range(fdp.ConsumeIntInRange(0, 8))]
    check_replies(fdp.ConsumeBytes(fdp.remaining_bytes()), pieces)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
