"""Run settings: one frozen dataclass, validated when built, with a secret that hides itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .cost import Price, price_for
from .errors import RunFatal
from .options import RequestOptions
from .plan import NamedPrompt
from .records import DEFAULT_PROMPT_NAME

DEFAULT_MODEL = "claude-3-5-sonnet-20240620"
DEFAULT_PROMPT = (
    "Write one factual caption for this image: the main subject, the setting and any "
    "notable details, in one or two plain sentences."
)
# Claude's per-image limit is 5 MB measured on the base64 text (protocol-reference 6.1).
DEFAULT_MAX_IMAGE_BYTES = 5 * 1024 * 1024


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
    manifest: Path
    out: Path
    base_url: str
    api_key: Secret
    model: str = DEFAULT_MODEL
    api: str = "openai"
    prompt: str = DEFAULT_PROMPT
    system: str | None = None
    max_tokens: int = 300
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
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_edge: int = 1568        # long edge sent at most (Claude's native resolution)
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

    def __post_init__(self) -> None:
        _positive("--concurrency", self.concurrency)
        _positive("--max-tokens", self.max_tokens)
        _positive("--flush-rows", self.flush_rows)
        _positive("--read-timeout", self.read_timeout)
        _positive("--connect-timeout", self.connect_timeout)
        _positive("--max-image-bytes", self.max_image_bytes)
        _positive("--max-edge", self.max_edge)
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
        self.options.check_protocol(self.api)
        if not self.base_url.startswith(("http://", "https://")):
            raise RunFatal(f"--base-url must start with http:// or https://, got "
                           f"{self.base_url!r}", "config", exit_code=2)

    @property
    def price(self) -> Price | None:
        return price_for(self.model, self.price_in, self.price_out)

    @property
    def named_prompts(self) -> tuple[NamedPrompt, ...]:
        if self.prompts:
            return tuple(NamedPrompt(n, t) for n, t in self.prompts)
        return (NamedPrompt(DEFAULT_PROMPT_NAME, self.prompt),)

    @property
    def endpoint(self) -> str:
        return self.base_url.rstrip("/")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise RunFatal(f"{name} must be greater than 0, got {value}", "config", exit_code=2)


def _non_negative(name: str, value: float) -> None:
    if not value >= 0:
        raise RunFatal(f"{name} must be 0 or more, got {value}", "config", exit_code=2)
