"""Fail fast on a wrong endpoint: the first attempts of a run, all failing the same way.

Until the first success, a failure that says the endpoint itself is wrong (nothing
listening, a name that does not resolve, a TLS handshake with a plain-HTTP port,
HTTP 404 / 405 / 501 on the URL) is not a row's problem: retrying every row for half a
minute and writing ``connection`` error rows only hides the typo. ``EndpointWatch``
counts such failures across the pool; ``LIMIT`` of one kind before any success stop
the run (exit 3) with one line naming the full URL tried and a hint. Those attempts
write no error row (the row waits and goes again until the watch decides). After the
first success the watch steps aside: a later failure is an ordinary one.
"""

from __future__ import annotations

from collections import Counter
from urllib.parse import urlsplit

from ..errors import PipelineError, RunFatal

__all__ = ["EndpointWatch", "LIMIT"]

LIMIT = 3  # failures of one kind, before any success, that make the endpoint wrong


class EndpointWatch:
    def __init__(self, base_url: str, path: str, key_source: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + path
        self.key_source = key_source
        self.confirmed = False  # one attempt succeeded: the endpoint is right
        self._seen: Counter[str] = Counter()

    def success(self) -> None:
        self.confirmed = True

    def probing(self, e: PipelineError) -> bool:
        """True when ``e`` is an endpoint-level failure before any success: the caller
        sends the row again instead of writing an error row (raises once it is clear)."""
        if self.confirmed:
            return False
        if e.endpoint is None:
            if e.http_status is not None:  # an answer from the API itself: the URL is right
                self.confirmed = True
            return False
        self._seen[e.endpoint] += 1
        if self._seen[e.endpoint] >= LIMIT:
            raise self.wrong(e.endpoint, e.message)
        return True

    def fatal(self, e: RunFatal) -> RunFatal:
        """A run-fatal answer, said with the URL (404) or the key's source (401/403)."""
        if e.error_class == "not_found" and not self.confirmed:
            return self.wrong("http 404", e.message)
        if e.error_class == "auth":
            where = (f"the key came from {self.key_source}" if self.key_source
                     else "no key was set (CAPTION_API_KEY, or the protocol's own variable)")
            return RunFatal(f"{e.message}; {where}", "auth", exit_code=e.exit_code,
                            http_status=e.http_status)
        return e

    def wrong(self, kind: str, detail: str) -> RunFatal:
        return RunFatal(f"the endpoint {self.url} {_WHAT.get(kind, kind)} ({detail}); "
                        f"{self.hint(kind)}", "endpoint", exit_code=3)

    def hint(self, kind: str) -> str:
        parts = urlsplit(self.url)
        if kind == "refused":
            return f"is the server running, and is {parts.hostname}:{parts.port} its port?"
        if kind == "dns":
            return f"is {parts.hostname!r} the right host name?"
        if kind == "tls":
            return ("the server does not speak TLS on this port: should --base-url start "
                    "with http:// ?" if parts.scheme == "https" else
                    "the TLS handshake failed: check the certificate and the scheme")
        base = urlsplit(self.base_url).path
        for tail in ("/chat/completions", "/messages", "/responses"):
            if base.endswith(tail):
                return f"--base-url is the API root: drop {tail!r} from it"
        if not any(seg.startswith("v1") for seg in base.split("/")):
            return "does --base-url need /v1 at the end (the API root, e.g. https://host/v1)?"
        return "is --base-url the API root of this server, and --api its protocol?"


_WHAT = {"refused": "refused the connection", "dns": "has a host name that does not resolve",
         "tls": "failed the TLS handshake", "http 404": "answered 404 Not Found",
         "http 405": "answered 405 Method Not Allowed",
         "http 501": "answered 501 Not Implemented"}
