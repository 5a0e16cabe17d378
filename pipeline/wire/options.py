"""Request options passed through to the API, validated before any request is sent.

Each option is checked against the range the API documents here; each protocol's
adapter checks what it can send (``Adapter.check``: an option the Anthropic Messages
API has no equivalent for is an error with its name, rather than a 400 on every row)
and maps the options to its own request fields.
"""

from __future__ import annotations

import json
import os
import stat
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RunFatal

__all__ = ["RequestOptions", "REASONING_EFFORTS", "DETAILS", "TOOL_NAME", "load_response_format",
           "load_tool_schema", "read_schema_file", "template_fields", "render_prompt",
           "MAX_SCHEMA_BYTES"]

# A JSON Schema file is read whole: more than this is no schema (a path to a device or
# a huge file would otherwise fill memory before the parse fails).
MAX_SCHEMA_BYTES = 1 << 20

REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")
DETAILS = ("low", "high", "auto")
TOOL_NAME = "caption"  # the one function a --tool-schema run offers and forces


def _bad(message: str) -> RunFatal:
    return RunFatal(message, "config", exit_code=2)


SERVICE_TIERS = ("flex", "default", "auto", "priority")  # docs/protocol.md §18


@dataclass(frozen=True)
class RequestOptions:
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, int] | None = None
    user: str | None = None
    seed: int | None = None
    response_format: dict[str, Any] | None = None
    extra_body: dict[str, Any] | None = None
    tool_schema: dict[str, Any] | None = None  # --tool-schema: JSON Schema of the arguments
    reasoning_effort: str | None = None        # one of REASONING_EFFORTS
    detail: str | None = None                  # one of DETAILS (OpenAI-style image parts)
    service_tier: str | None = None  # OpenAI's service_tier: flex, default, auto, priority

    def __post_init__(self) -> None:
        _between("--temperature", self.temperature, 0, 2)
        _between("--top-p", self.top_p, 0, 1)
        _between("--presence-penalty", self.presence_penalty, -2, 2)
        _between("--frequency-penalty", self.frequency_penalty, -2, 2)
        if not 1 <= self.n <= 128:
            raise _bad(f"--n must be between 1 and 128, got {self.n}")
        if self.service_tier is not None and self.service_tier not in SERVICE_TIERS:
            raise _bad(f"--service-tier must be one of {', '.join(SERVICE_TIERS)}, got "
                       f"{self.service_tier!r}")
        if len(self.stop) > 4:
            raise _bad(f"--stop may be given at most 4 times, got {len(self.stop)}")
        if self.reasoning_effort is not None and self.reasoning_effort not in REASONING_EFFORTS:
            raise _bad(f"--reasoning-effort must be one of {', '.join(REASONING_EFFORTS)}, "
                       f"got {self.reasoning_effort!r}")
        if self.detail is not None and self.detail not in DETAILS:
            raise _bad(f"--detail must be one of {', '.join(DETAILS)}, got {self.detail!r}")
        if self.tool_schema is not None and self.response_format is not None:
            raise _bad("--tool-schema and --response-format both shape the answer: give one")
        for token, bias in (self.logit_bias or {}).items():
            if (not str(token).isdigit() or isinstance(bias, bool) or not isinstance(bias, int)
                    or not -100 <= bias <= 100):
                raise _bad(f"--logit-bias wants token ids mapped to integers -100..100, "
                           f"got {token!r}: {bias!r}")

    def given(self, *names: str) -> dict[str, Any]:
        """The named options that were set (an adapter maps them to its own fields)."""
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def _between(name: str, value: float | None, low: float, high: float) -> None:
    if value is not None and not low <= value <= high:
        raise _bad(f"{name} must be between {low:g} and {high:g}, got {value:g}")


def read_schema_file(path: str, option: str) -> str:
    """The text of a schema file: a regular file of at most ``MAX_SCHEMA_BYTES``, opened
    without blocking (a FIFO with no writer must not hang the start), else exit 2."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _bad(f"{option} {path}: not a regular file")
            data = os.read(fd, MAX_SCHEMA_BYTES + 1)
        finally:
            os.close(fd)
    except OSError as e:
        raise _bad(f"{option} {path}: cannot read the schema file ({e.strerror})") from None
    if len(data) > MAX_SCHEMA_BYTES:
        raise _bad(f"{option} {path}: over {MAX_SCHEMA_BYTES >> 20} MiB: not a schema file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _bad(f"{option} {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def load_response_format(value: str | None) -> dict[str, Any] | None:
    """``json_object``, or a JSON Schema file for ``json_schema`` structured output."""
    if value is None:
        return None
    if value == "json_object":
        return {"type": "json_object"}
    path = Path(value)
    try:
        doc = json.loads(read_schema_file(value, "--response-format"))
    except (ValueError, RecursionError) as e:
        raise _bad(f"--response-format {value}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise _bad(f"--response-format {value}: a JSON Schema must be an object")
    if "schema" in doc and "name" in doc:  # already the json_schema envelope
        return {"type": "json_schema", "json_schema": doc}
    name = "".join(c if c.isalnum() or c in "_-" else "_" for c in path.stem)[:64] or "caption"
    return {"type": "json_schema",
            "json_schema": {"name": name, "schema": doc, "strict": True}}


def load_tool_schema(value: str | None) -> dict[str, Any] | None:
    """The JSON Schema of the ``caption`` function's arguments (an object schema)."""
    if value is None:
        return None
    try:
        doc = json.loads(read_schema_file(value, "--tool-schema"))
    except (ValueError, RecursionError) as e:
        raise _bad(f"--tool-schema {value}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("type", "object") != "object":
        raise _bad(f"--tool-schema {value}: function arguments are a JSON object: the "
                   'schema must be an object with "type": "object"')
    problem = schema_problem(doc)
    if problem:
        raise _bad(f"--tool-schema {value}: not a valid JSON Schema ({problem})")
    return doc


def schema_problem(schema: dict[str, Any]) -> str | None:
    """Why ``schema`` is not a JSON Schema (draft 2020-12), or None."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        return f"{'/'.join(map(str, e.path)) or 'top level'}: {e.message[:200]}"
    except RecursionError:
        return "nested too deeply to check"
    return None


def parse_json_option(name: str, value: str | None) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError as e:
        raise _bad(f"{name}: not valid JSON ({e})") from None


def template_fields(template: str) -> list[str]:
    """The manifest columns a ``--prompt`` template refers to (``{category}``)."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise _bad(f"--prompt: not a valid template ({e}); write {{{{ and }}}} for braces"
                   ) from None
    for f in fields:
        if f.startswith("caption.") and f.count(".") == 1:
            continue  # another prompt's caption of the image (sources/chain.py)
        if not f.isidentifier():
            raise _bad(f"--prompt: {{{f}}} is not a column name; templates take plain "
                       "{column} references (write {{ and }} for literal braces)")
    return fields


def render_prompt(template: str, values: dict[str, Any]) -> str:
    return template.format_map(values) if "{" in template else template
