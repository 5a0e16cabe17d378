"""Job files: a TOML description of a run, turned into `caption` arguments.

    manifest = "images.csv"          # paths are relative to the job file
    out = "../out/images"
    [api]     base_url, model, api, system, max_tokens, temperature, top_p, seed,
              response_format, extra_body (a table)
    [prompts] name = "text"          # one output row per image and prompt
    [limits]  concurrency, rpm, tpm, itpm, otpm, max_cost, retries, read_timeout
    [price]   input, output          # USD per million tokens
    [images]  max_edge, max_image_bytes, fetch_urls
    [output]  flush_rows, flush_seconds
    engine = "ray"                   # top level: caption on a Ray cluster (default "local")
    [ray]     address, actors        # with engine = "ray": --ray-address, --ray-actors

Arguments given on the command line after the job file override it (argparse keeps
the last value). An unknown key is an error naming the key and the file, so a typo
never silently falls back to a default. API keys stay in the environment.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from .errors import RunFatal

__all__ = ["job_argv"]

# section -> key -> (flag, type); a flag of None is handled specially.
_KEYS: dict[str, dict[str, tuple[str | None, type | tuple[type, ...]]]] = {
    "": {"manifest": (None, str), "out": ("--out", str), "engine": ("--engine", str)},
    "api": {"base_url": ("--base-url", str), "model": ("--model", str), "api": ("--api", str),
            "system": ("--system", str), "max_tokens": ("--max-tokens", int),
            "temperature": ("--temperature", (int, float)), "top_p": ("--top-p", (int, float)),
            "seed": ("--seed", int), "response_format": ("--response-format", str),
            "extra_body": ("--extra-body", dict)},
    "limits": {"concurrency": ("--concurrency", int), "rpm": ("--rpm", (int, float)),
               "tpm": ("--tpm", (int, float)), "itpm": ("--itpm", (int, float)),
               "otpm": ("--otpm", (int, float)), "max_cost": ("--max-cost", (int, float)),
               "retries": ("--retries", int), "read_timeout": ("--read-timeout", (int, float))},
    "price": {"input": ("--price-in", (int, float)), "output": ("--price-out", (int, float))},
    "images": {"max_edge": ("--max-edge", int), "max_image_bytes": ("--max-image-bytes", int),
               "fetch_urls": ("--fetch-urls", bool)},
    "output": {"flush_rows": ("--flush-rows", int), "flush_seconds": ("--flush-seconds",
                                                                     (int, float))},
    "ray": {"address": ("--ray-address", str), "actors": ("--ray-actors", int)},
}


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
    base = path.parent
    if "manifest" not in doc:
        raise _bad(path, "missing the top-level key 'manifest'")
    if not isinstance(doc["manifest"], str):
        raise _bad(path, f"manifest: expected a string, got {doc['manifest']!r}")
    argv = [str(base / doc["manifest"])]
    for section, value in doc.items():
        if isinstance(value, dict):
            argv += _section(path, section, value)
        else:
            argv += _option(path, "", section, value)
    return argv


def _section(path: Path, section: str, table: dict[str, Any]) -> list[str]:
    if section == "prompts":
        out = []
        for name, text in table.items():
            if not isinstance(text, str) or not name.replace("_", "").replace("-", "").isalnum():
                raise _bad(path, f"[prompts] {name}: want name = \"prompt text\"")
            out += ["--named-prompt", f"{name}={text}"]
        return out
    if section not in _KEYS or section == "":
        raise _bad(path, f"unknown section [{section}] (known: "
                         f"{', '.join(k for k in _KEYS if k)}, prompts)")
    out = []
    for key, value in table.items():
        out += _option(path, section, key, value)
    return out


def _option(path: Path, section: str, key: str, value: Any) -> list[str]:
    where = f"[{section}] {key}" if section else key
    if "key" in key.lower() and "api" in key.lower():
        raise _bad(path, f"{where}: keep API keys out of job files; set CAPTION_API_KEY")
    spec = _KEYS.get(section, {}).get(key)
    if spec is None:
        known = ", ".join(_KEYS.get(section, {}))
        raise _bad(path, f"unknown key {where} (known here: {known})")
    flag, kind = spec
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise _bad(path, f"{where}: expected {_name(kind)}, got {value!r}")
    if key == "engine" and value not in ("local", "ray"):
        raise _bad(path, f"engine = {value!r}: want \"local\" or \"ray\"")
    if flag is None:
        return []  # manifest: the positional argument, handled by job_argv
    if key in ("out",) or (key == "response_format" and value != "json_object"):
        value = str(path.parent / value)
    if isinstance(value, bool):
        return [flag] if value else []
    if isinstance(value, dict):
        return [flag, json.dumps(value)]
    return [flag, str(value)]


def _name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({"str": "a string", "int": "an integer", "float": "a number",
                        "bool": "true/false", "dict": "a table"}[k.__name__] for k in kinds)
