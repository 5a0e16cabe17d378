"""Run settings: one frozen dataclass, validated when built, with a secret that hides itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import RunFatal
from .pacing.cost import Price, batch_price_for, price_for
from .quality import QualitySettings
from .records import DEFAULT_PROMPT_NAME
from .sources.chain import chained, order
from .sources.manifest_format import ManifestFormat
from .sources.plan import NamedPrompt
from .wire.adapters import RequestSpec, get_adapter
from .wire.options import RequestOptions

DEFAULT_MODEL = "claude-3-5-sonnet-20240620"
DEFAULT_PROMPT = (
    "Write one factual caption for this image: the main subject, the setting and any "
    "notable details, in one or two plain sentences."
)
# Claude's per-image limit is 5 MB measured on the base64 text (docs/protocol.md §7.1).
DEFAULT_MAX_IMAGE_BYTES = 5 * 1024 * 1024
MiB = 1024 * 1024
# Bounds whose default follows --max-tokens (see the properties of Settings): generous
# enough for any honest answer, small enough that a broken server cannot fill memory.
LINE_FLOOR, LINE_PER_TOKEN = 1 * MiB, 4096          # one SSE line or event
RESPONSE_FLOOR, RESPONSE_PER_TOKEN = 16 * MiB, 16384  # one success body, stream or JSON
ATTEMPT_FLOOR, ATTEMPT_PER_TOKEN = 600.0, 0.1        # seconds for one whole attempt
# Each request in flight holds a socket, a queue slot and its buffers; no API serves one
# key thousands of parallel streams, so beyond this a value is a typo, not a plan.
MAX_CONCURRENCY = 4096
# Per batch, as the providers publish them (docs/protocol.md §17): OpenAI 50 000 requests
# and 200 MB per input file; Anthropic 100 000 requests or 256 MB per batch.
# OpenAI advises a 15-minute timeout for flex requests, which may wait for capacity.
FLEX_QUEUE_S = 900.0
BATCH_CAPS = {"openai": (50_000, 200 * 1000 * 1000), "anthropic": (100_000, 256 * 1000 * 1000)}


class Secret:
    """An API key. Its repr and str never show the value, so it cannot leak into logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__


@dataclass(frozen=True)
class Settings:
    manifest: Path | str        # "-" (or /dev/stdin): standard input; str: a URL or pattern
    out: Path
    base_url: str               # "" only for a dry run, which sends nothing
    api_key: Secret
    key_source: str | None = None  # the environment variable the key came from
    manifest_format: ManifestFormat = field(default_factory=ManifestFormat)
    model: str = DEFAULT_MODEL
    api: str = "openai"
    prompt: str = DEFAULT_PROMPT
    system: str | None = None
    max_tokens: int = 300
    stream: bool = True         # False (--no-stream): one JSON completion per request
    options: RequestOptions = field(default_factory=RequestOptions)
    prompts: tuple[tuple[str, str], ...] = ()  # named prompts; empty = ("default", prompt)
    concurrency: int = 16
    limit: int | None = None
    progress: bool = True
    retries: int = 5
    read_timeout: float = 60.0
    connect_timeout: float = 15.0
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    max_retry_after: float = 600.0
    max_rate_wait: float = 1800.0   # seconds one row may wait in total for the rate limit
    flush_rows: int = 100
    flush_seconds: float = 10.0
    grace: float = 30.0
    retry_errors: bool = False
    allow_mixed: bool = False   # resume into OUT although settings differ from _dataset.json
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_edge: int = 1568        # long edge sent at most (Claude's native resolution)
    max_file_bytes: int = 256 * MiB  # largest local image file read
    image_timeout: float = 60.0      # seconds one image may take to read and prepare
    attempt_timeout: float | None = None  # None: the default below; 0: no total deadline
    max_line_bytes: int | None = None     # None: the default below
    max_response_bytes: int | None = None  # None: the default below
    fetch_urls: bool = False    # download http(s) images and send them inline
    max_download_bytes: int = 50 * 1024 * 1024
    download_timeout: float = 60.0
    dedupe: bool = True         # caption identical images (bytes, prompt, model) once
    price_in: float | None = None   # USD per million tokens; None = the built-in table
    price_out: float | None = None
    max_cost: float | None = None   # USD this run may spend at most
    dry_run: bool = False
    log_format: str = "text"        # or "json": status lines and summary as JSON lines
    status_interval: float = 30.0   # seconds between status lines when not on a TTY
    rpm: float | None = None    # budgets per minute; None = learn from headers / adapt
    tpm: float | None = None
    itpm: float | None = None
    otpm: float | None = None
    engine: str = "local"           # or "ray": the same job on a Ray cluster (engine_ray.py)
    ray_address: str | None = None  # None = start a local Ray instance
    ray_actors: int | None = None   # caption actors; None = one per CPU of the cluster
    lane: str = "online"            # or "batch": the provider's batch API (pipeline/batch/)
    batch_max_bytes: int | None = None     # per request file; None = the provider's cap
    batch_max_requests: int | None = None  # per request file; None = the provider's cap
    batch_max_tokens: int | None = None    # estimated tokens per file (enqueued budget)
    wait: bool = False              # batch lane: poll until every batch has ended
    poll_interval: float = 60.0     # seconds between polls at most
    batch_price_in: float | None = None   # USD per million; None = half the online price
    batch_price_out: float | None = None
    flex_fallback_after: int = 2    # flex capacity refusals before a row's standard tier
    quality: QualitySettings = field(default_factory=QualitySettings)  # the quality gate

    def __post_init__(self) -> None:
        _positive("--concurrency", self.concurrency)
        if self.concurrency > MAX_CONCURRENCY:
            raise RunFatal(f"--concurrency {self.concurrency} is above the maximum of "
                           f"{MAX_CONCURRENCY}; use at most what the server's limits allow",
                           "config", exit_code=2)
        _positive("--max-tokens", self.max_tokens)
        _positive("--flush-rows", self.flush_rows)
        _positive("--read-timeout", self.read_timeout)
        _positive("--connect-timeout", self.connect_timeout)
        _positive("--max-image-bytes", self.max_image_bytes)
        _positive("--max-edge", self.max_edge)
        _positive("--max-file-bytes", self.max_file_bytes)
        _positive("--image-timeout", self.image_timeout)
        if self.attempt_timeout is not None:
            _non_negative("--attempt-timeout", self.attempt_timeout)
        for flag, cap in (("--max-line-bytes", self.max_line_bytes),
                          ("--max-response-bytes", self.max_response_bytes)):
            if cap is not None:
                _positive(flag, cap)
        _positive("--max-download-bytes", self.max_download_bytes)
        _positive("--download-timeout", self.download_timeout)
        _non_negative("--retries", self.retries)
        _non_negative("--backoff-base", self.backoff_base)
        _non_negative("--backoff-max", self.backoff_max)
        _non_negative("--max-retry-wait", self.max_retry_after)
        _non_negative("--max-rate-wait", self.max_rate_wait)
        _non_negative("--grace", self.grace)
        _positive("--flush-seconds", self.flush_seconds)
        for name in ("max_cost", "price_in", "price_out"):
            if getattr(self, name) is not None:
                _non_negative(f"--{name.replace('_', '-')}", getattr(self, name))
        _positive("--status-interval", self.status_interval)
        if self.max_cost is not None and self.price is None:
            raise RunFatal(f"--max-cost needs a price: no built-in price for model "
                           f"{self.model!r}; pass --price-in and --price-out (USD per "
                           "million tokens)", "config", exit_code=2)
        for name in ("rpm", "tpm", "itpm", "otpm"):
            if getattr(self, name) is not None:
                _positive(f"--{name}", getattr(self, name))
        if self.limit is not None:
            _non_negative("--limit", self.limit)
        if self.engine not in ("local", "ray"):
            raise RunFatal(f"--engine must be local or ray, got {self.engine!r}", "config",
                           exit_code=2)
        if self.ray_actors is not None:
            _positive("--ray-actors", self.ray_actors)
        self._check_batch()
        if self.prompts:
            self._check_chains()
        try:
            get_adapter(self.api).check(self.request_spec)
        except ValueError as e:
            raise RunFatal(str(e), "config", exit_code=2) from None
        if (self.base_url or not self.dry_run) and not self.base_url.startswith(
                ("http://", "https://")):
            raise RunFatal(f"--base-url must start with http:// or https://, got "
                           f"{self.base_url!r}", "config", exit_code=2)

    def _check_batch(self) -> None:
        if self.lane not in ("online", "batch"):
            raise RunFatal(f"--lane must be online or batch, got {self.lane!r}", "config",
                           exit_code=2)
        for name in ("batch_max_bytes", "batch_max_requests", "batch_max_tokens"):
            if getattr(self, name) is not None:
                _positive(f"--{name.replace('_', '-')}", getattr(self, name))
        for name in ("batch_price_in", "batch_price_out"):
            if getattr(self, name) is not None:
                _non_negative(f"--{name.replace('_', '-')}", getattr(self, name))
        _positive("--poll-interval", self.poll_interval)
        _non_negative("--flex-fallback-after", self.flex_fallback_after)
        if self.lane == "batch" and self.options.service_tier is not None:
            raise RunFatal("--service-tier is for the online lane (a batch has its own "
                           "price and window)", "config", exit_code=2)
        if self.lane == "batch" and self.engine != "local":
            raise RunFatal("--lane batch runs in this process: drop --engine "
                           f"{self.engine}", "config", exit_code=2)
        if self.lane == "batch" and self.api not in BATCH_CAPS:
            raise RunFatal(f"--lane batch needs --api openai or anthropic, got {self.api}",
                           "config", exit_code=2)

    def _check_chains(self) -> None:
        named = self.named_prompts  # exit 2 on an unknown prompt or a cycle
        if chained(named) and (self.engine != "local" or self.lane != "online"):
            raise RunFatal("chained prompts ({caption.NAME}) run on the local engine and "
                           "the online lane: each row waits for its image's upstream "
                           "caption", "config", exit_code=2)

    @property
    def price(self) -> Price | None:
        """The price of the lane this run uses (a batch row costs half by default)."""
        online = price_for(self.model, self.price_in, self.price_out)
        if self.lane == "batch":
            return batch_price_for(online, self.batch_price_in, self.batch_price_out)
        return online

    @property
    def batch_caps(self) -> tuple[int, int]:
        """(requests, bytes) per request file: the given caps, else the provider's."""
        requests, size = BATCH_CAPS[self.api]
        return (min(self.batch_max_requests or requests, requests),
                self.batch_max_bytes or size)

    @property
    def named_prompts(self) -> tuple[NamedPrompt, ...]:
        """The prompts, each after those whose captions it uses ({caption.NAME})."""
        if self.prompts:
            return order(tuple(NamedPrompt(n, t) for n, t in self.prompts))
        return (NamedPrompt(DEFAULT_PROMPT_NAME, self.prompt),)

    @property
    def chained(self) -> bool:
        return chained(self.named_prompts)

    @property
    def line_cap(self) -> int:
        """Longest SSE line or event: 1 MiB, or 4 KiB per --max-tokens token if more."""
        if self.max_line_bytes is not None:
            return self.max_line_bytes
        return max(LINE_FLOOR, LINE_PER_TOKEN * self.max_tokens)

    @property
    def response_cap(self) -> int:
        """Largest success body per attempt (bounds a caption's text): 16 MiB, or
        16 KiB per --max-tokens token if more."""
        if self.max_response_bytes is not None:
            return self.max_response_bytes
        return max(RESPONSE_FLOOR, RESPONSE_PER_TOKEN * self.max_tokens)

    @property
    def attempt_deadline(self) -> float | None:
        """Total seconds for one attempt: 600, or 0.1 per --max-tokens token if more;
        None when --attempt-timeout 0 turned it off."""
        if self.attempt_timeout is not None:
            return self.attempt_timeout or None
        return max(ATTEMPT_FLOOR, ATTEMPT_PER_TOKEN * self.max_tokens,
                   FLEX_QUEUE_S if self.flex else 0.0)

    @property
    def flex(self) -> bool:
        return self.options.service_tier == "flex"

    @property
    def idle_timeout(self) -> float:
        """Seconds with no byte before an attempt is retried. On the flex tier a request
        may sit in the provider's queue before its first byte: that is not idleness,
        so the timeout is at least ``FLEX_QUEUE_S`` there (docs/protocol.md §18)."""
        return max(self.read_timeout, FLEX_QUEUE_S) if self.flex else self.read_timeout

    def tier_price(self, tier: str | None) -> Price | None:
        """The price of a row served on ``tier``: flex at the batch price (half the
        online price unless --batch-price-* say otherwise), any other at the online."""
        online = price_for(self.model, self.price_in, self.price_out)
        if tier == "flex":
            return batch_price_for(online, self.batch_price_in, self.batch_price_out)
        return online

    @property
    def request_spec(self) -> RequestSpec:
        """What the protocol adapter gets of these settings (no key, no paths)."""
        return RequestSpec(self.model, self.max_tokens, self.system, self.options,
                           self.stream)

    @property
    def endpoint(self) -> str:
        return self.base_url.rstrip("/")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise RunFatal(f"{name} must be greater than 0, got {value}", "config", exit_code=2)


def _non_negative(name: str, value: float) -> None:
    if not value >= 0:
        raise RunFatal(f"{name} must be 0 or more, got {value}", "config", exit_code=2)
