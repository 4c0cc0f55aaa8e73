"""MessageLines.next_chunk's whole-buffer fast path against the per-line reference loop."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from portcullis.smtp.framing import MessageEnd, MessageLines, Problem


class ReferenceLines(MessageLines):
    """MessageLines held to the per-line loop."""

    next_chunk = MessageLines._next_chunk_by_lines


class EagerLines(MessageLines):
    """MessageLines trying the fast path on buffers of any size, as small inputs need."""

    fast_path_min = 0


def assert_same_framing(reads, max_line: int, max_size: int, size: int = 0) -> None:
    """Both framers, fed the same reads, agree after every call: the result, the
    buffer left, and size, problem and line start. After each end, a new message."""
    fast, reference = EagerLines(max_line, max_size), ReferenceLines(max_line, max_size)
    fast.start(size)
    reference.start(size)
    fast_buf, reference_buf = bytearray(), bytearray()
    for read in reads:
        fast_buf += read
        reference_buf += read
        while True:
            result = fast.next_chunk(fast_buf)
            expected = reference.next_chunk(reference_buf)
            assert (type(result), result) == (type(expected), expected)
            assert (fast_buf, fast.size, fast.problem, fast._line_start) == (
                reference_buf, reference.size, reference.problem, reference._line_start)
            if result is None:
                break
            if isinstance(result, MessageEnd):
                fast.start()
                reference.start()


def frame(lines: MessageLines, reads) -> list:
    """Every result but None, up to and including the first MessageEnd or Problem."""
    buf = bytearray()
    results = []
    for read in reads:
        buf += read
        while (result := lines.next_chunk(buf)) is not None:
            results.append(result)
            if not isinstance(result, bytes):
                return results
    return results


def in_reads(data: bytes, size: int = 64 * 1024) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


# --- every input, every split into reads ---------------------------------------------

_line_bodies = st.one_of(
    st.sampled_from([b"", b".", b"..", b"a", b".a", b"a.", b"a\rb", b"a\nb"]),
    st.integers(1, 45).map(lambda n: b"a" * n),
    st.integers(1, 45).map(lambda n: b"." + b"a" * n),
)
_line_ends = st.sampled_from([b"\r\n"] * 8 + [b"\n", b"\r", b"", b"\r\r\n", b"\n\r"])
_lines = st.tuples(_line_bodies, _line_ends).map(b"".join)
_noise = st.sampled_from([b"\r", b"\n", b".", b"a", b".\r\n", b"\r\n.\r\n", b"\r\n.", b"\r\n.."])
_clean_block = st.integers(1, 30).map(lambda n: b"line\r\n..x\r\n" * n)
_content = st.lists(st.one_of(_lines, _lines, _clean_block, _noise), max_size=40).map(b"".join)


@settings(max_examples=1500, deadline=None)
@given(data=st.data(), content=_content, max_line=st.integers(5, 40),
       max_size=st.integers(0, 600), size=st.integers(0, 40))
def test_fast_path_frames_as_the_line_loop_does(data, content, max_line, max_size, size):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(content)), max_size=8)))
    bounds = [0, *cuts, len(content)]
    reads = [content[a:b] for a, b in itertools.pairwise(bounds)]
    assert_same_framing(reads, max_line, max_size, size)


@pytest.mark.parametrize("reads, max_line, max_size", [
    ([b"..aaaaaa\r\n.\r\n"], 9, 100),  # a stuffed line one octet over: the dot is free
    ([b"aaaaaaa\r\n.\r\n"], 9, 100),  # exactly max_line
    ([b"aaaaaaaa\r\n.\r\n"], 9, 100),  # one over
    ([b"ab\r\n", b"aaaaaaaaa"], 9, 100),  # a partial line at the limit waits
    ([b"ab\r\n", b"aaaaaaaaaa"], 9, 100),  # one over is dropped at once
    ([b"ab\r\ncd\r\n.", b"\r", b"\nnext"], 9, 100),  # the final dot split across reads
    ([b"ab\r\n.\r\nEHLO x\r\n"], 9, 100),  # commands after the final dot stay
    ([b"ab\r\n..\r\n.\r\n"], 9, 8),  # exactly max_size, unstuffed
    ([b"ab\r\n..\r\n.\r\n"], 9, 7),  # one over
    ([b".\r\n"], 9, 100),  # an empty message
    ([b"ab\r\n", b"\r\n.\r\n"], 9, 100),
    ([b"ab\r\nc\r\r\n.\r\n"], 9, 100),
    ([b"ab\r\n\n.\r\n"], 9, 100),
])
def test_edges_frame_as_the_line_loop_does(reads, max_line, max_size):
    assert_same_framing(reads, max_line, max_size)


# --- large messages ------------------------------------------------------------------

_LINE = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor\r\n"
_STUFFED = b"..a line that began with a dot\r\n"
_MEGABYTE = (_LINE * 400 + _STUFFED) * 32  # 1 MiB and a little over, 32 stuffed lines


def test_a_clean_megabyte_takes_the_fast_path(monkeypatch):
    seen_by_loop = []
    loop = MessageLines._next_chunk_by_lines

    def spy(self, buf):
        seen_by_loop.append(bytes(buf))
        return loop(self, buf)

    monkeypatch.setattr(MessageLines, "_next_chunk_by_lines", spy)
    lines = MessageLines(1000, 10 << 20)
    reads = in_reads(_MEGABYTE + b".\r\n")
    results = frame(lines, reads)
    assert results[-1] == MessageEnd(None)
    assert len(results) <= len(reads) + 1
    assert b"".join(results[:-1]) == _MEGABYTE
    assert lines.size == len(_MEGABYTE) - 32
    # The loop only waited on partial lines and saw the final dot.
    assert all(b"\n" not in buf for buf in seen_by_loop[:-1])
    assert seen_by_loop[-1] == b".\r\n"


_DOTLESS = _LINE.replace(b",", b" ") * 13_000  # about 1 MiB without a single dot
_DEEP = _DOTLESS.index(b"\n", 700_000) + 1  # a line start deep in it


@pytest.mark.parametrize("content, stuffed", [
    (_DOTLESS, 0),  # no dot anywhere: the fast path's memchr finds none
    (_DOTLESS[:_DEEP] + _STUFFED + _DOTLESS[_DEEP:], 1),  # one stuffed line, deep in it
])
def test_dots_only_deep_or_nowhere_frame_as_the_line_loop_does(content, stuffed):
    reads = in_reads(content + b".\r\n")
    lines = MessageLines(1000, 10 << 20)
    results = frame(lines, reads)
    assert results == frame(ReferenceLines(1000, 10 << 20), reads)
    assert results[-1] == MessageEnd(None)
    assert b"".join(results[:-1]) == content
    assert lines.size == len(content) - stuffed


def test_an_early_final_dot_in_a_dotless_megabyte_ends_the_message_there():
    content = _DOTLESS[:_DEEP] + b".\r\nRSET\r\n" + _DOTLESS[_DEEP:]
    results = frame(MessageLines(1000, 10 << 20), in_reads(content))
    assert results == frame(ReferenceLines(1000, 10 << 20), in_reads(content))
    assert results[-1] == MessageEnd(None)
    assert b"".join(results[:-1]) == _DOTLESS[:_DEEP]


@pytest.mark.parametrize("flaw, last", [
    (b"x" * 999 + b"\r\n", MessageEnd(Problem.LINE_TOO_LONG)),
    (b"a\nb\r\n", Problem.BARE_LF),
    (b"a\rb\r\n", Problem.BARE_LF),
])
def test_a_flaw_deep_in_a_megabyte_is_found(flaw, last):
    at = len(_MEGABYTE) * 2 // 3
    at = _MEGABYTE.index(b"\n", at) + 1
    content = _MEGABYTE[:at] + flaw + _MEGABYTE[at:] + b".\r\n"
    results = frame(MessageLines(1000, 10 << 20), in_reads(content))
    assert results[-1] == last
    assert len(b"".join(results[:-1])) <= at
    assert results == frame(ReferenceLines(1000, 10 << 20), in_reads(content))


def test_a_megabyte_over_the_size_limit_is_refused():
    max_size = len(_MEGABYTE) - 32 - 1  # one octet short, unstuffed
    content = _MEGABYTE + b".\r\n"
    results = frame(MessageLines(1000, max_size), in_reads(content))
    assert results[-1] == MessageEnd(Problem.SIZE)
    assert results == frame(ReferenceLines(1000, max_size), in_reads(content))
    assert frame(MessageLines(1000, max_size + 1), in_reads(content))[-1] == MessageEnd(None)
