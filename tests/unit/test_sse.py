"""The SSE decoder as a specification: framing survives any split of the bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.wire.sse import DEFAULT_MAX_LINE, Event, SSEDecoder, StreamTooLong

# A realistic stream: CRLF, LF and lone CR endings, comments, no-space data, multi-line data,
# id/retry fields, UTF-8 split candidates (é, 世界, 🚀), U+2028 inside JSON, and [DONE].
STREAM = (
    b": OPENROUTER PROCESSING\n\n"
    b'data: {"t":"A caf\xc3\xa9, \xe4\xb8\x96\xe7\x95\x8c"}\r\n\r\n'
    b"event: message\nid: 7\nretry: 3000\n"
    b'data:{"t":"and \xf0\x9f\x9a\x80 \xe2\x80\xa8 sep"}\r\r'
    b'data: {"a":\ndata: 1}\n\r\n'
    b": PING\r\n\r\n"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    Event("message", '{"t":"A café, 世界"}'),
    Event("message", '{"t":"and 🚀 \u2028 sep"}'),
    Event("message", '{"a":\n1}'),
    Event("message", "[DONE]"),
]


def decode(chunks: list[bytes], max_line: int = DEFAULT_MAX_LINE) -> list[Event]:
    d = SSEDecoder(max_line)
    out: list[Event] = []
    for c in chunks:
        out += d.feed(c)
    return out + d.finish()


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted(set(c % (len(data) + 1) for c in cuts))
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]


def test_whole_stream_in_one_read() -> None:
    assert decode([STREAM]) == EXPECTED


def test_every_single_split_point() -> None:
    for i in range(len(STREAM) + 1):
        assert decode([STREAM[:i], STREAM[i:]]) == EXPECTED, i


def test_one_byte_per_read() -> None:
    assert decode([bytes([b]) for b in STREAM]) == EXPECTED


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
def test_random_rechunking_gives_the_same_events(cuts: list[int]) -> None:
    assert decode(split_at(STREAM, cuts)) == EXPECTED


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.text(alphabet=st.characters(blacklist_characters="\r\n",
                                            blacklist_categories=("Cs",)), max_size=30),
             min_size=1, max_size=8),
    st.sampled_from([b"\n", b"\r\n", b"\r"]),
    st.lists(st.integers(min_value=0, max_value=5000), max_size=30),
)
def test_any_payload_any_line_ending_any_split(payloads: list[str], eol: bytes,
                                               cuts: list[int]) -> None:
    body = b"".join(b"data: " + p.encode() + eol + eol for p in payloads)
    expected = [Event("message", p) for p in payloads]
    assert decode(split_at(body, cuts)) == expected


def test_crlf_split_between_reads_is_one_line_break() -> None:
    assert decode([b"data: x\r", b"\n\r", b"\ndata: y\r\n\r\n"]) == [
        Event("message", "x"), Event("message", "y")]


def test_unterminated_last_event_is_flushed_at_end() -> None:
    assert decode([b"data: [DONE]"]) == [Event("message", "[DONE]")]


def test_comments_are_counted_not_dispatched() -> None:
    d = SSEDecoder()
    assert d.feed(b": keep-alive\n\n: PING\r\n\r\n") == []
    assert d.comments == 2


def test_event_name_is_kept() -> None:
    assert decode([b"event: ping\ndata: {}\n\n"]) == [Event("ping", "{}")]


def test_bare_json_line_is_surfaced_not_dropped() -> None:
    body = b'data: {"x":1}\n\n{"error":{"message":"upstream error"}}\n'
    assert decode([body]) == [Event("message", '{"x":1}'),
                              Event("raw", '{"error":{"message":"upstream error"}}')]


def test_only_one_leading_space_is_removed() -> None:
    assert decode([b"data:  two\n\n"]) == [Event("message", " two")]


def test_huge_single_line_event_within_the_cap() -> None:
    payload = "x" * 3_000_000  # beyond aiohttp's 512 KiB readline cap
    body = b"data: " + payload.encode() + b"\n\n"
    assert decode(split_at(body, list(range(0, len(body), 65_536))), max_line=4_000_000) == [
        Event("message", payload)]


def test_a_line_at_the_cap_is_decoded() -> None:
    body = b"data: " + b"x" * 94 + b"\n\n"  # 100 bytes of line
    assert decode([body], max_line=100) == [Event("message", "x" * 94)]


@pytest.mark.parametrize("read", [1, 7, 4096])
def test_a_line_that_never_ends_fails_once_past_the_cap(read: int) -> None:
    d = SSEDecoder(max_line=1000)
    fed = 0
    with pytest.raises(StreamTooLong, match="longer than 1000 bytes"):
        d.feed(b"data: ")
        while True:
            d.feed(b"y" * read)
            fed += read
            assert fed <= 1000 + read, "the decoder kept collecting past its cap"


def test_a_long_line_inside_one_read_fails() -> None:
    with pytest.raises(StreamTooLong):
        SSEDecoder(max_line=1000).feed(b"data: " + b"z" * 2000 + b"\n\n")


def test_an_event_of_endless_short_data_lines_fails_once_past_the_cap() -> None:
    d = SSEDecoder(max_line=1000)
    with pytest.raises(StreamTooLong, match="an event"):
        for _ in range(200):
            d.feed(b"data: 0123456789\n")  # never a blank line: never dispatched


def test_comments_do_not_count_towards_the_event_cap() -> None:
    d = SSEDecoder(max_line=1000)
    for _ in range(500):
        assert d.feed(b": keep-alive\n\n") == []
    assert d.feed(b"data: ok\n\n") == [Event("message", "ok")]
