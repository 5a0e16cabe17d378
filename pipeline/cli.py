"""Command line: argv and environment → ``Settings`` → run → exit code and one stderr line.

This is the only place that reads ``sys.argv`` or decides exit codes. Every
``PipelineError`` that reaches it becomes one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import PipelineError, RunFatal
from .options import RequestOptions, load_response_format, parse_json_option
from .settings import DEFAULT_MODEL, DEFAULT_PROMPT, Secret, Settings

EXIT_CODES = """exit codes:
  0    every row ok
  1    finished, but some rows failed permanently (see the error / error_class columns)
  2    usage, config or manifest error
  3    fatal API error (authentication, endpoint or model not found, quota exhausted)
  4    OUT is locked by another run
  5    --max-cost reached: no new rows were started (rerun to resume)
  130  interrupted by SIGINT, 143 by SIGTERM (finished rows are flushed; rerun to resume)
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse's own usage block is noise in cron logs: one line, exit 2.
        self.exit(2, f"{self.prog}: error: {message}\n")


def _env(*names: str) -> str | None:
    for n in names:
        if os.environ.get(n):
            return os.environ[n]
    return None


_KEY_ENV = {"openai": ("CAPTION_API_KEY", "OPENAI_API_KEY"),
            "anthropic": ("CAPTION_API_KEY", "ANTHROPIC_API_KEY")}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m pipeline caption",
                description="Caption every image of a CSV manifest with a vision LLM over a "
                            "streaming OpenAI-compatible API; results go to a Parquet dataset.",
                epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("manifest", type=Path, help="CSV with an 'image' column (path or http(s) URL)")
    a("--out", type=Path, help="output dataset directory (default out/<manifest stem>)")
    a("--base-url", help="API root such as https://host/v1 "
                         "(env CAPTION_BASE_URL, then OPENAI_BASE_URL)")
    a("--api", choices=["openai", "anthropic"], default="openai",
      help="wire protocol: OpenAI-compatible chat completions ({base}/chat/completions, "
           "default) or Anthropic's native Messages API ({base}/messages)")
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
    a("--extra-body", metavar="JSON", help="extra top-level request fields, merged as given")
    a("--concurrency", type=int, default=16, help="requests in flight at most (default 16)")
    a("--limit", type=int, help="caption only the first N pending rows")
    a("--no-progress", action="store_true", help="no progress bar (automatic without a TTY)")
    a("--retries", type=int, default=5, help="retries per row after the first attempt (5)")
    a("--read-timeout", type=float, default=60.0,
      help="seconds without a byte before a stream is retried (idle, not total; 60)")
    a("--connect-timeout", type=float, default=15.0, help="connect timeout seconds (15)")
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
    a("--max-image-bytes", type=int, default=5 * 1024 * 1024,
      help="largest image payload, measured as base64 (default 5 MiB, Claude's limit)")
    a("--max-edge", type=int, default=1568,
      help="downscale so the long edge is at most N px (default 1568; never upscaled)")
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
    a("--engine", choices=["local", "ray"], default="local",
      help="where rows are captioned: this process (default) or a Ray cluster")
    a("--ray-address", metavar="ADDR",
      help="with --engine ray: the cluster to join ('auto', or the head's HOST:6379); "
           "default: start a local Ray instance")
    a("--ray-actors", type=int, metavar="N",
      help="with --engine ray: caption actors (default: one per CPU of the cluster)")
    a("-v", "--verbose", action="store_true", help="debug logging")
    return p


def settings_from_args(ns: argparse.Namespace) -> Settings:
    base_url = ns.base_url or _env("CAPTION_BASE_URL", "OPENAI_BASE_URL")
    if not base_url:
        raise RunFatal("no endpoint configured: pass --base-url https://host/v1 or set "
                       "CAPTION_BASE_URL (or run `make demo` to try the local simulator)",
                       "config", exit_code=2)
    out = ns.out or Path("out") / ns.manifest.stem
    return Settings(
        manifest=ns.manifest, out=out, base_url=base_url,
        api_key=Secret(_env(*_KEY_ENV[ns.api]) or ""), api=ns.api,
        model=ns.model, prompt=ns.prompt, system=ns.system, max_tokens=ns.max_tokens,
        options=options_from_args(ns), concurrency=ns.concurrency, limit=ns.limit,
        progress=not ns.no_progress, retries=ns.retries, read_timeout=ns.read_timeout,
        connect_timeout=ns.connect_timeout, backoff_base=ns.backoff_base,
        backoff_max=ns.backoff_max, flush_rows=ns.flush_rows, flush_seconds=ns.flush_seconds,
        grace=ns.grace, max_retry_after=ns.max_retry_wait, max_rate_wait=ns.max_rate_wait,
        retry_errors=ns.retry_errors,
        max_image_bytes=ns.max_image_bytes,
        rpm=ns.rpm, tpm=ns.tpm, itpm=ns.itpm, otpm=ns.otpm, max_edge=ns.max_edge,
        fetch_urls=ns.fetch_urls, max_download_bytes=ns.max_download_bytes,
        download_timeout=ns.download_timeout, dedupe=not ns.no_dedupe,
        prompts=named_prompts(ns.named_prompt), price_in=ns.price_in, price_out=ns.price_out,
        max_cost=ns.max_cost, dry_run=ns.dry_run, log_format=ns.log_format,
        status_interval=ns.status_interval, engine=ns.engine, ray_address=ns.ray_address,
        ray_actors=ns.ray_actors,
    )


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
        extra_body=extra)


def caption(argv: Sequence[str]) -> int:
    ns = build_parser().parse_args(list(argv))
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.WARNING,
                        format="%(levelname)s %(message)s", stream=sys.stderr)
    from .runner import run  # imported late: `--help` stays fast

    try:
        settings = settings_from_args(ns)
        if settings.dry_run:
            from .dryrun import dry_run

            return asyncio.run(dry_run(settings))
        result = asyncio.run(run(settings))
    except PipelineError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        return 130
    if result.fatal:
        label = "stopped" if result.exit_code == 5 else "error"
        print(f"{label}: {result.fatal}", file=sys.stderr)
    print(result.summary, flush=True)  # the result on stdout; diagnostics on stderr
    return result.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline {caption,simulate,demo} ...``; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    commands = {"caption": caption, "run": _run_job, "status": _status, "report": _report,
                "simulate": _simulate, "demo": _demo}
    if not args or args[0] in ("-h", "--help") or args[0] not in commands:
        print("usage: python -m pipeline {caption,run,status,report,simulate,demo} ...\n"
              "  caption MANIFEST [options]   caption a manifest (see caption --help)\n"
              "  run JOB.toml [options]       run a job file; options override it\n"
              "  status OUT [--manifest M]    done / failed / pending and the last runs\n"
              "  report OUT                   write OUT/report.html, a review gallery\n"
              "  simulate [--port P]          serve the local gateway simulator\n"
              "  demo                         caption data/sample with the simulator",
              file=sys.stderr if args and args[0] not in ("-h", "--help") else sys.stdout)
        return 0 if args and args[0] in ("-h", "--help") else 2
    try:
        return commands[args[0]](args[1:])
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _run_job(argv: Sequence[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print("usage: python -m pipeline run JOB.toml [caption options]", file=sys.stderr)
        return 2
    from .jobfile import job_argv

    try:
        job = job_argv(Path(argv[0]))
    except PipelineError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    return caption([*job, *argv[1:]])


def _status(argv: Sequence[str]) -> int:
    from . import status

    return status.main(list(argv))


def _report(argv: Sequence[str]) -> int:
    from . import report

    return report.main(list(argv))


def _simulate(argv: Sequence[str]) -> int:
    from . import simulator

    return simulator.main(list(argv))


def _demo(argv: Sequence[str]) -> int:
    from . import demo

    return demo.main(list(argv))
