"""Sans-I/O decoder for server-sent events (the WHATWG "event stream" grammar).

Owns framing only: bytes in, events out. It knows nothing of HTTP or JSON, so it can
be fed from any transport and tested by re-chunking real streams at random.

Rules (docs/protocol.md §1):
* lines end with CRLF, LF or a lone CR; a CR that ends one network read is held as a
  line end and a following LF is swallowed, so CRLF split across reads is one break;
* frame on bytes and decode complete lines, so a multi-byte UTF-8 character split
  across reads is never mangled and U+2028 inside JSON is not a line break;
* an empty line dispatches; `:` lines are comments; one leading space after the
  colon is dropped; several `data` lines join with "\\n"; `id`/`retry` are ignored;
* a line that is not a field but looks like JSON (a gateway writing a raw error
  object into the stream) is surfaced as an event named ``raw`` instead of dropped;
* one line, and the data of one event, may hold at most ``max_line`` bytes: a server
  that never ends a line (or an event) raises ``StreamTooLong`` once the cap is
  passed, so memory stays bounded by the cap, whatever the server sends.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_MAX_LINE", "Event", "SSEDecoder", "StreamTooLong"]

DEFAULT_MAX_LINE = 1 << 20


class StreamTooLong(Exception):
    """A line or an event passed the decoder's cap: this stream is broken."""


@dataclass(frozen=True, slots=True)
class Event:
    """One dispatched event. ``event`` is "message" when the stream named none."""

    event: str
    data: str


class SSEDecoder:
    """Incremental decoder: ``feed(chunk)`` returns the events completed by it."""

    __slots__ = ("_buf", "_tail", "_tail_len", "_skip_lf", "_event", "_data", "_data_len",
                 "max_line", "comments", "invalid_utf8")

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        self.max_line = max_line
        self._buf = b""
        # Reads without a line break are only collected, and joined once the line
        # ends: a long line arriving a few bytes at a time stays linear, not quadratic.
        self._tail: list[bytes] = []
        self._tail_len = 0
        self._skip_lf = False
        self._event: str | None = None
        self._data: list[str] = []
        self._data_len = 0
        self.comments = 0  # keep-alive comments seen; liveness only
        self.invalid_utf8 = 0  # lines with bytes that are not UTF-8 (replaced by U+FFFD)

    def feed(self, chunk: bytes) -> list[Event]:
        if self._skip_lf and chunk:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if b"\n" not in chunk and b"\r" not in chunk:
            if chunk:
                self._tail.append(chunk)
                self._tail_len += len(chunk)
                if len(self._buf) + self._tail_len > self.max_line:
                    raise self._too_long("a line")
            return []
        self._join_tail()
        buf = self._buf + chunk if self._buf else chunk
        out: list[Event] = []
        start = 0
        n = len(buf)
        while start < n:
            lf = buf.find(b"\n", start)
            cr = buf.find(b"\r", start, lf if lf >= 0 else n)
            if cr >= 0:  # a CR comes first: CR or CRLF
                end, nxt = cr, cr + 1
                if nxt < n:
                    if buf[nxt] == 0x0A:
                        nxt += 1
                else:
                    self._skip_lf = True  # CRLF may be split across reads
            elif lf >= 0:
                end, nxt = lf, lf + 1
            else:
                break
            self._line(buf[start:end], out)
            start = nxt
        self._buf = buf[start:]
        if len(self._buf) > self.max_line:
            raise self._too_long("a line")
        return out

    def finish(self) -> list[Event]:
        """End of stream: an unterminated last line and event are still processed."""
        out: list[Event] = []
        self._join_tail()
        if self._buf:
            self._line(self._buf, out)
            self._buf = b""
        self._dispatch(out)
        return out

    def _join_tail(self) -> None:
        if self._tail:
            self._buf += b"".join(self._tail)
            self._tail.clear()
            self._tail_len = 0

    def _too_long(self, what: str) -> StreamTooLong:
        # Drop what was collected: the stream is abandoned, the memory need not wait.
        self._buf, self._data = b"", []
        self._tail.clear()
        self._tail_len = self._data_len = 0
        return StreamTooLong(f"{what} of the event stream is longer than {self.max_line} "
                             "bytes")

    def _line(self, raw: bytes, out: list[Event]) -> None:
        if not raw:
            self._dispatch(out)
            return
        if len(raw) > self.max_line:
            raise self._too_long("a line")
        if raw[0] == 0x3A:  # ":" comment
            self.comments += 1
            return
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:  # replaced, and counted: the caller records a quirk
            line = raw.decode("utf-8", errors="replace")
            self.invalid_utf8 += 1
        name, sep, value = line.partition(":")
        if value[:1] == " ":
            value = value[1:]
        if name == "data":  # "data" alone means an empty data line
            self._data_len += len(raw)
            if self._data_len > self.max_line:
                raise self._too_long("an event")
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif line.lstrip()[:1] in ("{", "["):
            # Not SSE at all: a raw JSON object written into the body after the
            # headers were flushed (gateways do this with errors). Dispatch it alone.
            self._dispatch(out)
            out.append(Event("raw", line.strip()))
        # id, retry and unknown fields are ignored by the grammar.

    def _dispatch(self, out: list[Event]) -> None:
        if self._data:
            out.append(Event(self._event or "message", "\n".join(self._data)))
        self._event = None
        self._data = []
        self._data_len = 0
