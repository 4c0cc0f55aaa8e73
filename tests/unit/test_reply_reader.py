"""The backend's replies, read sans-IO with hard limits (upstream.ReplyReader)."""

import pytest
from portcullis.upstream import MAX_REPLY_LINES, MalformedReply, ReplyReader


def read(*pieces: bytes) -> list:
    reader = ReplyReader()
    replies = []
    for piece in pieces:
        reader.feed(piece)
        while (reply := reader.next_reply()) is not None:
            replies.append(reply)
    return replies


def test_replies_split_anywhere_and_multiline_come_out_whole():
    replies = read(b"250-mx.test\r\n250-PIPE", b"LINING\r\n250 8BITMIME\r\n25", b"0 2.1.0 Ok\r\n")
    assert [(r.code, r.text) for r in replies] == [(250, "mx.test\nPIPELINING\n8BITMIME"),
                                                   (250, "Ok")]
    assert replies[1].enhanced == "2.1.0"


def test_an_unfinished_reply_is_pending():
    reader = ReplyReader()
    reader.feed(b"250-first\r\n")
    assert reader.next_reply() is None and reader.pending


@pytest.mark.parametrize("data", [
    b"hello, this is not SMTP\r\n",
    b"073 a code outside 2xx-5xx\r\n",  # found by fuzzing
    b"250-one\r\n550 another code in the same reply\r\n",
    b"250 " + b"x" * 2000 + b"\r\n",
    b"".join(b"250-line\r\n" for _ in range(MAX_REPLY_LINES)) + b"250 last\r\n",
])
def test_what_is_not_a_reply_within_the_limits_is_refused(data):
    with pytest.raises(MalformedReply):
        read(data)
