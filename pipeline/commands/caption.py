"""``python -m pipeline caption``: argv and environment → ``Settings`` → a run session.

The caption command's argument parser (job files derive their keys from it), the
reading of the environment (key, endpoint, model), and the command itself: every
``PipelineError`` becomes one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import PipelineError, RunFatal
from ..logs import Say, setup_logging, wants_json
from ..redact import add_secret
from ..settings import DEFAULT_MODEL, DEFAULT_PROMPT, MAX_CONCURRENCY, Secret, Settings
from ..sources.braces import has_braces
from ..sources.location import is_url
from ..sources.manifest_format import SOURCE_KINDS, ManifestFormat, is_stdin, is_stream
from ..wire.adapters import ADAPTERS, get_adapter
from ..wire.options import (
    DETAILS,
    REASONING_EFFORTS,
    RequestOptions,
    load_response_format,
    load_tool_schema,
    parse_json_option,
)
from .quality_args import add_quality_args, quality_from_args

EXIT_CODES = """exit codes:
  0    every row ok
  1    finished, but some rows failed permanently (see the error / error_class columns)
  2    usage, config or manifest error
  3    fatal API error (authentication, endpoint or model not found, quota exhausted)
  4    OUT is locked by another run
  5    --max-cost reached: no new rows were started (rerun to resume)
  6    output cannot be written (disk full, no file descriptors, OUT read-only or gone):
       no new request was started; rows not committed stay pending (rerun to resume)
  129  SIGHUP, 130 SIGINT, 143 SIGTERM: interrupted (finished rows are flushed; rerun
       to resume)
"""


def did_you_mean(word: str, known: Sequence[str], quote: bool = False) -> str:
    """``; did you mean X?`` for the closest of ``known``, or nothing. Leading dashes
    are not compared: every option has them, so they would make anything look close."""
    bare = {k.lstrip("-"): k for k in known}
    close = difflib.get_close_matches(word.lstrip("-"), list(bare), n=1, cutoff=0.7)
    if not close:  # --out-dir: a real name with something added
        close = sorted((k for k in bare if len(k) > 2 and word.lstrip("-").startswith(k)),
                       key=len)[-1:]
    if not close:
        return ""
    return f"; did you mean {bare[close[0]]!r}?" if quote else f"; did you mean {bare[close[0]]}?"


class _Parser(argparse.ArgumentParser):
    json_errors = False  # set by the caller that knows the requested log format

    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse's own usage block is noise in cron logs: one line, exit 2.
        if message.startswith("unrecognized arguments: "):
            message = self._unknown(message.removeprefix("unrecognized arguments: ").split())
        line = Say(self.json_errors).line("error", message, exit_code=2)
        self.exit(2, (line if self.json_errors else f"{self.prog}: {line}") + "\n")

    def _unknown(self, words: list[str]) -> str:
        """Name each unknown option with the closest real one: the fix, not the symptom."""
        known = [o for a in self._actions for o in a.option_strings]
        opts = [w.split("=", 1)[0] for w in words if w.startswith("-")]
        if not opts:
            return (f"unexpected argument {' '.join(words)!r} (caption takes one manifest; "
                    "quote values that contain spaces)")
        return "; ".join(f"unknown option {o}{did_you_mean(o, known) or ' (see --help)'}"
                         for o in opts)


def _env(*names: str) -> str | None:
    for n in names:
        if os.environ.get(n):
            return os.environ[n]
    return None



def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m pipeline caption",
                description="Caption every image of a CSV manifest with a vision LLM over a "
                            "streaming OpenAI-compatible API; results go to a Parquet dataset.",
                epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("manifest", type=manifest_arg,
      help="what to caption: a CSV/TSV, JSONL or Parquet manifest, a folder of images, "
           "WebDataset shards (x.tar, 'shards/{00000..00099}.tar'); local or a URL "
           "(s3://, gs://, hf://, https://); '-' reads a CSV from standard input")
    a("--out", type=Path, help="output dataset directory (default out/<manifest stem>)")
    a("--base-url", help="API root such as https://host/v1 "
                         "(env CAPTION_BASE_URL, then OPENAI_BASE_URL)")
    a("--api", choices=list(ADAPTERS), default="openai",
      help="wire protocol: OpenAI-compatible chat completions ({base}/chat/completions, "
           "default), Anthropic's Messages API ({base}/messages), OpenAI's Responses API "
           "({base}/responses) or Gemini's native API ({base}/models/MODEL:"
           "streamGenerateContent, --base-url with its version, e.g. .../v1beta)")
    a("--no-stream", action="store_true",
      help="ask for one JSON completion per request instead of a stream (every protocol)")
    a("--model", default=_env("CAPTION_MODEL") or DEFAULT_MODEL,
      help=f"model name (env CAPTION_MODEL; default {DEFAULT_MODEL})")
    a("--prompt", default=DEFAULT_PROMPT, help="user instruction sent with each image")
    a("--system", help="optional system message")
    a("--max-tokens", type=int, default=300, help="max tokens per caption (default 300)")
    a("--temperature", type=float, help="sampling temperature, 0-2")
    a("--top-p", type=float, help="nucleus sampling, 0-1")
    a("--n", type=int, default=1, help="captions per image (choices; output column "
                                      "'captions'); OpenAI-compatible only")
    a("--stop", action="append", default=[], metavar="TEXT",
      help="stop sequence (repeatable, up to 4)")
    a("--presence-penalty", type=float, help="-2 to 2")
    a("--frequency-penalty", type=float, help="-2 to 2")
    a("--logit-bias", metavar="JSON", help='token id → bias -100..100, e.g. \'{"50256": -100}\'')
    a("--user", help="end-user id passed to the provider (Anthropic: metadata.user_id)")
    a("--seed", type=int, help="sampling seed, where the provider supports it")
    a("--response-format", metavar="json_object|SCHEMA.json",
      help="structured output: 'json_object', or a JSON Schema file (json_schema); the "
           "caption is parsed into caption_json")
    a("--tool-schema", metavar="SCHEMA.json",
      help="caption as a forced function call whose arguments follow this JSON Schema; "
           "the arguments are the caption, parsed into caption_json")
    a("--reasoning-effort", choices=list(REASONING_EFFORTS),
      help="thinking models: sent explicitly in each protocol's form (reasoning_effort, "
           "reasoning.effort, Anthropic thinking, Gemini thinkingBudget)")
    a("--detail", choices=list(DETAILS),
      help="image detail on OpenAI-style image parts (openai, responses); low costs a "
           "fixed few tokens")
    a("--extra-body", metavar="JSON", help="extra top-level request fields, merged as given")
    a("--concurrency", type=int, default=16,
      help=f"requests in flight at most (default 16, at most {MAX_CONCURRENCY})")
    a("--limit", type=int, help="caption only the first N pending rows")
    a("--no-progress", action="store_true", help="no progress bar (automatic without a TTY)")
    a("--retries", type=int, default=5, help="retries per row after the first attempt (5)")
    a("--read-timeout", type=float, default=60.0,
      help="seconds without a byte before a stream is retried (idle, not total; 60)")
    a("--connect-timeout", type=float, default=15.0, help="connect timeout seconds (15)")
    a("--attempt-timeout", type=float, metavar="S",
      help="total seconds one attempt may take, however steadily bytes trickle in "
           "(default 600, or 0.1 s per --max-tokens token if more; 0: none)")
    a("--max-line-bytes", type=int, metavar="N",
      help="longest SSE line or event; longer is a broken stream, retried (default "
           "1 MiB, or 4 KiB per --max-tokens token if more)")
    a("--max-response-bytes", type=int, metavar="N",
      help="largest successful response per attempt, streamed or JSON; bounds one "
           "caption's text (default 16 MiB, or 16 KiB per --max-tokens token if more)")
    a("--backoff-base", type=float, default=1.0, help="first retry delay ceiling, s (1)")
    a("--backoff-max", type=float, default=60.0, help="largest retry delay ceiling, s (60)")
    a("--flush-rows", type=int, default=100, help="commit a Parquet part every K rows (100)")
    a("--flush-seconds", type=float, default=10.0, help="... or every T seconds (10)")
    a("--max-retry-wait", type=float, default=600.0,
      help="longest server-directed wait (Retry-After, reset headers) honoured, s (600)")
    a("--max-rate-wait", type=float, default=1800.0,
      help="total seconds a row may wait for the rate limit (429/529 refusals do not "
           "use up --retries), then it is an error row (1800)")
    a("--grace", type=float, default=30.0,
      help="seconds in-flight rows get after SIGINT/SIGTERM (30)")
    a("--retry-errors", action="store_true",
      help="re-attempt rows that earlier runs recorded as errors")
    a("--allow-mixed", action="store_true",
      help="add rows to OUT although its _dataset.json records other settings (model, "
           "prompt, system, ...) for a prompt name, or other images for an id")
    a("--max-image-bytes", type=int, default=5 * 1024 * 1024,
      help="largest image payload, measured as base64 (default 5 MiB, Claude's limit)")
    a("--max-edge", type=int, default=1568,
      help="downscale so the long edge is at most N px (default 1568; never upscaled)")
    a("--max-file-bytes", type=int, default=256 * 1024 * 1024,
      help="largest local image file read; checked before and while reading "
           "(default 256 MiB)")
    a("--image-timeout", type=float, default=60.0,
      help="seconds one image may take to read and prepare; longer is a bad_image row, "
           "e.g. a hung network mount (60)")
    a("--fetch-urls", action="store_true",
      help="download http(s) images and send them inline (default: pass URLs through)")
    a("--max-download-bytes", type=int, default=50 * 1024 * 1024,
      help="largest image download with --fetch-urls (default 50 MiB)")
    a("--download-timeout", type=float, default=60.0,
      help="seconds per image download with --fetch-urls (60)")
    a("--no-dedupe", action="store_true",
      help="caption every row even when its image, prompt and model repeat")
    a("--named-prompt", action="append", default=[], metavar="NAME=TEXT",
      help="a named prompt (repeatable): each image gets one row per prompt, keyed by "
           "(id, prompt_name); replaces --prompt")
    a("--price-in", type=float, help="USD per million input tokens (default: built-in "
                                     "table for well-known models)")
    a("--price-out", type=float, help="USD per million output tokens")
    a("--max-cost", type=float, metavar="USD",
      help="stop taking new rows once spent + in-flight estimates would pass this (exit 5)")
    a("--dry-run", action="store_true",
      help="read the manifest and images; print rows, estimated tokens and cost; send nothing")
    a("--log-format", choices=["text", "json"], default="text",
      help="status lines and summary as text or JSON lines (for log collectors)")
    a("--status-interval", type=float, default=30.0,
      help="seconds between status lines when stderr is not a TTY (30)")
    a("--rpm", type=float, help="requests-per-minute budget (default: learn from the "
                                "server's rate-limit headers, else adapt to 429s)")
    a("--tpm", type=float, help="tokens-per-minute budget (input + output)")
    a("--itpm", type=float, help="input-tokens-per-minute budget (Anthropic ITPM)")
    a("--otpm", type=float, help="output-tokens-per-minute budget (Anthropic OTPM)")
    a("--format", choices=SOURCE_KINDS,
      help="the input's kind (default: from its form: .jsonl, .parquet, .tar or a brace "
           "pattern, a folder, else CSV)")
    a("--delimiter", metavar="CHAR",
      help="manifest field separator: ',', ';', tab ('tab' or '\\t') or '|' "
           "(default: detected from the header)")
    a("--image-column", default="image", metavar="NAME",
      help="the manifest column with image paths or URLs (default 'image')")
    a("--id-column", default="id", metavar="NAME",
      help="the manifest column with row ids (default 'id'; without one, ids are "
           "derived from the image)")
    a("--engine", choices=["local", "ray"], default="local",
      help="where rows are captioned: this process (default) or a Ray cluster")
    a("--ray-address", metavar="ADDR",
      help="with --engine ray: the cluster to join ('auto', or the head's HOST:6379); "
           "default: start a local Ray instance")
    a("--ray-actors", type=int, metavar="N",
      help="with --engine ray: caption actors (default: one per CPU of the cluster)")
    a("--lane", choices=["online", "batch"], default="online",
      help="online requests (default), or the provider's batch API at half the price "
           "(--api openai or anthropic; results within 24 h; rerun or --wait to collect)")
    a("--batch-max-bytes", type=int, metavar="N",
      help="with --lane batch: largest request file (default: the provider's cap, "
           "200 MB OpenAI, 256 MB Anthropic)")
    a("--batch-max-requests", type=int, metavar="N",
      help="with --lane batch: requests per file (default: the provider's cap, "
           "50000 OpenAI, 100000 Anthropic)")
    a("--batch-max-tokens", type=int, metavar="N",
      help="with --lane batch: estimated tokens per file (an enqueued-token budget)")
    a("--wait", action="store_true",
      help="with --lane batch: poll until every batch has ended, resubmitting what "
           "expired or failed transiently (default: submit, or collect, and exit)")
    a("--poll-interval", type=float, default=60.0, metavar="S",
      help="with --wait: seconds between polls of the batches (60)")
    a("--batch-price-in", type=float, metavar="USD",
      help="batch lane price per million input tokens (default: half of --price-in)")
    a("--batch-price-out", type=float, metavar="USD",
      help="batch lane price per million output tokens (default: half of --price-out)")
    a("--service-tier", choices=["flex", "default", "auto", "priority"],
      help="OpenAI service_tier; flex: about half the price, slower, may answer 429 "
           "'Resource Unavailable' (no rate limit: the row retries, then falls back)")
    a("--flex-fallback-after", type=int, default=2, metavar="N",
      help="with --service-tier flex: capacity refusals of a row before it is sent on "
           "the standard tier (2; the cost budget still applies)")
    add_quality_args(p)
    a("-v", "--verbose", action="count", default=0,
      help="debug logging: -v this tool's (retries, failures), -vv also libraries'")
    return p


def _config(message: str) -> RunFatal:
    return RunFatal(message, "config", exit_code=2)


def settings_from_args(ns: argparse.Namespace) -> Settings:
    base_url = ns.base_url or _env("CAPTION_BASE_URL", "OPENAI_BASE_URL") or ""
    if not base_url and not ns.dry_run:  # a dry run sends nothing: it needs no endpoint
        raise _config("no endpoint configured: pass --base-url https://host/v1 or set "
                      "CAPTION_BASE_URL (or run `make demo` to try the local simulator)")
    if is_stdin(ns.manifest) and ns.out is None:
        raise _config("the manifest comes from standard input: pass --out DIR (a rerun "
                      "with the same DIR resumes)")
    if ns.engine == "ray" and is_stream(ns.manifest):
        raise _config(f"--engine ray reads the manifest on a cluster node: save "
                      f"{ns.manifest} to a file and pass its path")
    out = ns.out or Path("out") / manifest_stem(ns.manifest)
    key_source = next((n for n in get_adapter(ns.api).key_env if os.environ.get(n)), None)
    key = os.environ[key_source] if key_source else ""
    add_secret(key)  # before anything can print, log or write it
    add_secret(urlsplit(base_url).password)
    return Settings(
        manifest=ns.manifest, out=out, base_url=base_url,
        manifest_format=manifest_format(ns),
        api_key=Secret(key), key_source=key_source, api=ns.api,
        model=ns.model, prompt=ns.prompt, system=ns.system, max_tokens=ns.max_tokens,
        stream=not ns.no_stream,
        options=options_from_args(ns), concurrency=ns.concurrency, limit=ns.limit,
        progress=not ns.no_progress and ns.log_format != "json",  # a bar is not JSON
        retries=ns.retries, read_timeout=ns.read_timeout,
        connect_timeout=ns.connect_timeout, backoff_base=ns.backoff_base,
        backoff_max=ns.backoff_max, flush_rows=ns.flush_rows, flush_seconds=ns.flush_seconds,
        grace=ns.grace, max_retry_after=ns.max_retry_wait, max_rate_wait=ns.max_rate_wait,
        retry_errors=ns.retry_errors,
        allow_mixed=ns.allow_mixed,
        max_image_bytes=ns.max_image_bytes, max_file_bytes=ns.max_file_bytes,
        image_timeout=ns.image_timeout, attempt_timeout=ns.attempt_timeout,
        max_line_bytes=ns.max_line_bytes, max_response_bytes=ns.max_response_bytes,
        rpm=ns.rpm, tpm=ns.tpm, itpm=ns.itpm, otpm=ns.otpm, max_edge=ns.max_edge,
        fetch_urls=ns.fetch_urls, max_download_bytes=ns.max_download_bytes,
        download_timeout=ns.download_timeout, dedupe=not ns.no_dedupe,
        prompts=named_prompts(ns.named_prompt), price_in=ns.price_in, price_out=ns.price_out,
        max_cost=ns.max_cost, dry_run=ns.dry_run, log_format=ns.log_format,
        status_interval=ns.status_interval, engine=ns.engine, ray_address=ns.ray_address,
        ray_actors=ns.ray_actors, lane=ns.lane, batch_max_bytes=ns.batch_max_bytes,
        batch_max_requests=ns.batch_max_requests, batch_max_tokens=ns.batch_max_tokens,
        wait=ns.wait, poll_interval=ns.poll_interval, batch_price_in=ns.batch_price_in,
        batch_price_out=ns.batch_price_out, flex_fallback_after=ns.flex_fallback_after,
        quality=quality_from_args(ns),
    )


def manifest_format(ns: argparse.Namespace) -> ManifestFormat:
    return ManifestFormat.parse(ns.delimiter, ns.image_column, ns.id_column,
                                getattr(ns, "format", None))


def manifest_arg(text: str) -> Path | str:
    """A URL (or a brace pattern) stays text: a Path would fold ``s3://`` to ``s3:/``."""
    return text if is_url(text) or has_braces(text) else Path(text)


def manifest_stem(manifest: Path | str) -> str:
    """The default OUT's name: the manifest's stem, a folder's name, a pattern's stem
    with its braces left out."""
    name = str(manifest).rstrip("/").rsplit("/", 1)[-1]
    name = name.split("{", 1)[0].rstrip("_-.") or "shards"
    for ext in (".tar.gz", ".tgz", ".tar", ".jsonl", ".ndjson", ".parquet", ".csv", ".tsv"):
        if name.lower().endswith(ext):
            return name[:-len(ext)] or "manifest"
    return Path(name).stem or "manifest"


def named_prompts(values: list[str]) -> tuple[tuple[str, str], ...]:
    out: dict[str, str] = {}
    for v in values:
        name, sep, text = v.partition("=")
        if not sep or not name.strip() or not text.strip():
            raise RunFatal(f"--named-prompt wants NAME=TEXT, got {v!r}", "config", exit_code=2)
        out[name.strip()] = text  # a later definition (command line) overrides the job's
    return tuple(out.items())


def options_from_args(ns: argparse.Namespace) -> RequestOptions:
    bias = parse_json_option("--logit-bias", ns.logit_bias)
    extra = parse_json_option("--extra-body", ns.extra_body)
    if bias is not None and not isinstance(bias, dict):
        raise RunFatal("--logit-bias must be a JSON object", "config", exit_code=2)
    if extra is not None and not isinstance(extra, dict):
        raise RunFatal("--extra-body must be a JSON object", "config", exit_code=2)
    return RequestOptions(
        temperature=ns.temperature, top_p=ns.top_p, n=ns.n, stop=tuple(ns.stop),
        presence_penalty=ns.presence_penalty, frequency_penalty=ns.frequency_penalty,
        logit_bias={str(k): v for k, v in bias.items()} if bias is not None else None,
        user=ns.user, seed=ns.seed, response_format=load_response_format(ns.response_format),
        extra_body=extra, tool_schema=load_tool_schema(ns.tool_schema),
        reasoning_effort=ns.reasoning_effort, detail=ns.detail, service_tier=ns.service_tier)


def caption(argv: Sequence[str]) -> int:
    parser = build_parser()
    parser.json_errors = wants_json(argv)  # type: ignore[attr-defined]
    ns = parser.parse_args(list(argv))
    setup_logging(ns.verbose, ns.log_format == "json")
    say = Say(ns.log_format == "json")
    from ..engines import get_engine  # imported late: `--help` stays fast
    from ..run.session import RunSession

    try:
        settings = settings_from_args(ns)
        if settings.dry_run and settings.lane == "batch":
            from .batchplan import batch_plan

            return asyncio.run(batch_plan(settings))
        if settings.dry_run:
            from .dryrun import dry_run

            return asyncio.run(dry_run(settings))
        engine = get_engine("batch" if settings.lane == "batch" else settings.engine)
        result = asyncio.run(RunSession(settings, engine).execute())
    except PipelineError as e:
        say("error", e.message, exit_code=getattr(e, "exit_code", 2))
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        return 130
    if result.fatal:
        budget = result.exit_code == 5
        say("stopped" if budget else "error", result.fatal,
            level="warning" if budget else "error", exit_code=result.exit_code)
    print(result.summary, flush=True)  # the result on stdout; diagnostics on stderr
    return result.exit_code
