"""Job files: a TOML description of a run, turned into `caption` arguments.

Every option of `caption` can be set, because the keys are derived from its argument
parser (``pipeline.commands.caption.build_parser``): an option added there is settable here at once.
A key is the option's name with ``_`` for ``-`` (``--max-tokens`` is ``max_tokens``),
in the section ``SECTIONS`` gives it, else at the top level:

    manifest = "images.csv"          # paths are relative to the job file; "-" = stdin
    out = "../out/images"
    [api]     base_url, model, prompt, system, max_tokens, temperature, stop, ...
    [prompts] name = "text"          # one output row per image and prompt
    [limits]  concurrency, rpm, tpm, max_cost, retries, read_timeout, grace, ...
    [price]   input, output          # USD per million tokens (--price-in, --price-out)
              batch_input, batch_output  # the batch lane's (default: half of those)
    [images]  max_edge, max_image_bytes, fetch_urls, no_dedupe, ...
    [output]  flush_rows, flush_seconds, log_format, status_interval, ...
    [ray]     address, actors        # --ray-address, --ray-actors
    [batch]   max_bytes, max_requests, max_tokens, wait, poll_interval  # with lane = "batch"
    [quality] refusal, boilerplate, min_words, max_words, min_chars, max_chars,
              banned_phrases, language, json_schema, max_repeats, policy, reask

Values: a switch (``--fetch-urls``) takes true/false, a repeatable option (``--stop``)
a string or a list of strings, a JSON option (``--extra-body``) a table. Arguments
given on the command line after the job file override it (argparse keeps the last
value). An unknown key is an error naming the key, the file and the closest real key,
so a typo never silently falls back to a default. API keys stay in the environment.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RunFatal

__all__ = ["SECTIONS", "JobKey", "job_argv", "job_key", "job_keys"]

SECTIONS: dict[str, tuple[str, ...]] = {
    "api": ("base_url", "api", "model", "prompt", "system", "max_tokens", "temperature",
            "top_p", "n", "stop", "presence_penalty", "frequency_penalty", "logit_bias",
            "user", "seed", "response_format", "extra_body", "no_stream", "tool_schema",
            "reasoning_effort", "detail", "service_tier"),
    "limits": ("concurrency", "rpm", "tpm", "itpm", "otpm", "max_cost", "limit", "retries",
               "read_timeout", "connect_timeout", "backoff_base", "backoff_max",
               "max_retry_wait", "max_rate_wait", "grace", "attempt_timeout", "max_line_bytes",
               "max_response_bytes", "flex_fallback_after"),
    "images": ("max_edge", "max_image_bytes", "fetch_urls", "max_download_bytes",
               "download_timeout", "no_dedupe", "max_file_bytes", "image_timeout"),
    "output": ("flush_rows", "flush_seconds", "retry_errors", "allow_mixed", "no_progress",
               "log_format", "status_interval"),
}
# Keys whose name in a job file is not the option's own.
ALIASES: dict[str, tuple[str, str]] = {
    "price_in": ("price", "input"), "price_out": ("price", "output"),
    "batch_price_in": ("price", "batch_input"), "batch_price_out": ("price", "batch_output"),
    "batch_max_bytes": ("batch", "max_bytes"), "batch_max_requests": ("batch", "max_requests"),
    "batch_max_tokens": ("batch", "max_tokens"), "wait": ("batch", "wait"),
    "poll_interval": ("batch", "poll_interval"),
    "ray_address": ("ray", "address"), "ray_actors": ("ray", "actors"),
    "named_prompt": ("prompts", "NAME"),  # a table of its own: [prompts] name = "text"
    # [quality]: every --quality-X is X there; the phrase list is plural.
    **{f"quality_{k}": ("quality", k) for k in (
        "refusal", "boilerplate", "min_words", "max_words", "min_chars", "max_chars",
        "language", "json_schema", "max_repeats", "policy", "reask")},
    "quality_banned_phrase": ("quality", "banned_phrases"),
}
# Values relative to the job file.
_PATH_VALUED = {"out", "manifest", "response_format", "tool_schema", "json_schema"}
_NOT_A_PATH = {"-", "json_object"}                      # stdin; JSON mode


@dataclass(frozen=True)
class JobKey:
    section: str              # "" = top level
    name: str
    flag: str | None          # None: the positional manifest
    kind: str                 # switch, bool, count, list, int, number, text, json
    choices: tuple[str, ...] | None = None
    off_flag: str | None = None  # a bool's --no-X

    @property
    def where(self) -> str:
        return f"[{self.section}] {self.name}" if self.section else self.name


def job_key(dest: str) -> tuple[str, str]:
    """Where the option stored as ``dest`` lives in a job file: (section, key)."""
    if dest in ALIASES:
        return ALIASES[dest]
    for section, names in SECTIONS.items():
        if dest in names:
            return section, dest
    return "", dest


def _kind(action: argparse.Action) -> str:
    if isinstance(action, argparse.BooleanOptionalAction):
        return "bool"  # --x / --no-x: true or false, either way explicit
    if isinstance(action, argparse._CountAction):
        return "count"
    if action.nargs == 0:
        return "switch"
    if isinstance(action, argparse._AppendAction):
        return "list"
    if action.metavar == "JSON":
        return "json"
    if action.type is int:
        return "int"
    return "number" if action.type is float else "text"


@functools.cache
def job_keys() -> dict[tuple[str, str], JobKey]:
    """Every settable key, from the caption parser's options."""
    from .caption import build_parser

    keys: dict[tuple[str, str], JobKey] = {}
    for action in build_parser()._actions:
        if isinstance(action, argparse._HelpAction) or action.dest == "named_prompt":
            continue
        section, name = job_key(action.dest)
        flag = max(action.option_strings, key=len) if action.option_strings else None
        off = None
        if isinstance(action, argparse.BooleanOptionalAction):
            flag, off = action.option_strings[0], action.option_strings[-1]
        choices = tuple(map(str, action.choices)) if action.choices else None
        keys[(section, name)] = JobKey(section, name, flag, _kind(action), choices, off)
    return keys


def _bad(path: Path, problem: str) -> RunFatal:
    return RunFatal(f"job file {path}: {problem}", "config", exit_code=2)


def load(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise _bad(path, "not found") from None
    except OSError as e:
        raise _bad(path, f"cannot be read ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise _bad(path, f"not valid TOML ({e})") from None


def job_argv(path: Path) -> list[str]:
    """The `caption` arguments a job file stands for."""
    doc = load(path)
    if "manifest" not in doc:
        raise _bad(path, "missing the top-level key 'manifest'")
    argv = _values(path, job_keys()[("", "manifest")], doc["manifest"])
    for name, value in doc.items():
        if name == "manifest":
            continue
        if isinstance(value, dict):
            argv += _section(path, name, value)
        else:
            argv += _option(path, "", name, value)
    return argv


def _sections() -> set[str]:
    return {s for s, _ in job_keys() if s} | {"prompts"}


def _section(path: Path, section: str, table: dict[str, Any]) -> list[str]:
    if section == "prompts":
        out = []
        for name, text in table.items():
            if not isinstance(text, str) or not name.replace("_", "").replace("-", "").isalnum():
                raise _bad(path, f"[prompts] {name}: want name = \"prompt text\"")
            out += ["--named-prompt", f"{name}={text}"]
        return out
    if section not in _sections():
        if ("", section) in job_keys():
            raise _bad(path, f"{section} is a top-level key, not a section: "
                             f"{section} = ...")
        close = difflib.get_close_matches(section, sorted(_sections()), n=1)
        hint = f"; did you mean [{close[0]}]?" if close else \
            f" (sections: {', '.join(sorted(_sections()))})"
        raise _bad(path, f"unknown section [{section}]{hint}")
    out = []
    for key, value in table.items():
        out += _option(path, section, key, value)
    return out


def _option(path: Path, section: str, name: str, value: Any) -> list[str]:
    lowered = name.lower()
    if "key" in lowered and ("api" in lowered or lowered in ("key", "secret_key")):
        raise _bad(path, f"{name}: keep API keys out of job files; set CAPTION_API_KEY")
    key = job_keys().get((section, name))
    if key is None:
        raise _bad(path, _unknown(section, name))
    return _values(path, key, value)


def _unknown(section: str, name: str) -> str:
    where = f"[{section}] {name}" if section else name
    home = [k for (_, n), k in job_keys().items() if n == name]
    if name in ALIASES:  # the option's own name for a key that has another
        home = [job_keys()[ALIASES[name]]] if ALIASES[name] in job_keys() else home
    if home:  # a real key in the wrong place
        place = f"[{home[0].section}]" if home[0].section else "the top level"
        return f"{where} belongs in {place}: {home[0].where} = ..."
    here = sorted(n for s, n in job_keys() if s == section)
    close = difflib.get_close_matches(name, here, n=1, cutoff=0.7) or \
        difflib.get_close_matches(name, [n for _, n in job_keys()], n=1, cutoff=0.7)
    if close:
        return f"unknown key {where}; did you mean {job_keys()[_find(close[0])].where}?"
    return f"unknown key {where} (known here: {', '.join(here)})"


def _find(name: str) -> tuple[str, str]:
    return next(k for k in job_keys() if k[1] == name)


def _values(path: Path, key: JobKey, value: Any) -> list[str]:
    """The arguments for one key's value, after checking its type."""
    kind = key.kind
    if kind == "bool":
        if not isinstance(value, bool):
            return _wrong(path, key, "true/false", value)
        return [(key.flag if value else key.off_flag) or ""]
    if kind in ("switch", "count"):
        if isinstance(value, bool) or (kind == "count" and isinstance(value, int)
                                       and value >= 0):
            return [key.flag or ""] * int(value)
        return _wrong(path, key, "true/false" if kind == "switch" else "a count (0, 1, 2)",
                      value)
    if kind == "list":
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) for v in items):
            return _wrong(path, key, "a string or a list of strings", value)
        return [a for v in items for a in (key.flag or "", v)]
    if kind == "json":
        if isinstance(value, dict | list):
            return [key.flag or "", json.dumps(value)]
        if not isinstance(value, str):
            return _wrong(path, key, "a table (or JSON text)", value)
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        return _wrong(path, key, "an integer", value)
    if kind == "number" and (isinstance(value, bool) or not isinstance(value, int | float)):
        return _wrong(path, key, "a number", value)
    if kind == "text" and not isinstance(value, str):
        return _wrong(path, key, "a string", value)
    if key.choices and str(value) not in key.choices:
        close = difflib.get_close_matches(str(value), key.choices, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"one of {', '.join(key.choices)}"
        raise _bad(path, f"{key.where} = {value!r}: {hint}")
    text = str(value)
    if key.name in _PATH_VALUED and text not in _NOT_A_PATH and "://" not in text:
        text = str(path.parent / text)  # a URL (s3://...) is where it says
    return [text] if key.flag is None else [key.flag, text]


def _wrong(path: Path, key: JobKey, wanted: str, value: Any) -> list[str]:
    raise _bad(path, f"{key.where}: expected {wanted}, got {value!r}")
