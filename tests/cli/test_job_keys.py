"""Job files can set every `caption` option, and jobs/example.toml shows each key.

The list of options comes from the caption parser itself (``build_parser``), so an
option added there without a line in the example fails here, and is settable anyway.
"""

from __future__ import annotations

import argparse
import json
import re
import tomllib
from pathlib import Path

import pytest
from conftest import FAST, REPO, write_manifest
from fake_gateway import img
from test_jobs_and_operations import lines, main_run, write_job

from pipeline.commands.caption import build_parser
from pipeline.commands.jobfile import job_argv, job_key, job_keys

EXAMPLE = REPO / "jobs" / "example.toml"


def parser_dests() -> list[str]:
    return [a.dest for a in build_parser()._actions if not isinstance(a, argparse._HelpAction)]


def shown_keys(text: str) -> dict[tuple[str, str], bool]:
    """(section, key) -> set (True) or shown commented out (False), as the file reads."""
    shown: dict[tuple[str, str], bool] = {}
    section = ""
    for raw in text.splitlines():
        commented = raw.startswith("# ")
        line = raw[2:] if commented else raw
        head = re.match(r"\[(\w+)\]", line)
        if head:
            section = head.group(1)
            continue
        key = re.match(r"(\w+)\s*=", line)
        if key:
            shown.setdefault((section, key.group(1)), not commented)
    return shown


def test_every_caption_option_has_a_job_file_key() -> None:
    keys = job_keys()
    for dest in parser_dests():
        if dest != "named_prompt":  # that one is the [prompts] table
            assert job_key(dest) in keys, dest


def test_an_option_added_to_the_parser_is_settable_at_once(monkeypatch, tmp_path) -> None:
    import pipeline.commands.caption as caption_command

    real = caption_command.build_parser

    def grown() -> argparse.ArgumentParser:
        p = real()
        p.add_argument("--frobnicate-level", type=int)
        return p

    monkeypatch.setattr(caption_command, "build_parser", grown)
    job_keys.cache_clear()
    try:
        job = write_job(tmp_path / "j.toml", 'manifest = "m.csv"\nfrobnicate_level = 3\n')
        assert job_argv(job)[1:] == ["--frobnicate-level", "3"]
    finally:
        job_keys.cache_clear()


def test_example_job_shows_every_option_commented_where_optional() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    shown = shown_keys(text)
    missing = [job_key(d) for d in parser_dests()
               if d != "named_prompt" and job_key(d) not in shown]
    assert missing == []
    assert shown[("", "manifest")] is True               # the one required key is set
    assert any(section == "prompts" for section, _ in shown)
    tomllib.loads(text)                                 # what is set parses, as a job too
    assert job_argv(EXAMPLE)


def test_every_commented_example_line_is_a_valid_job_setting(tmp_path: Path) -> None:
    """Uncommenting every key of the example gives a job that loads and parses."""
    text = EXAMPLE.read_text(encoding="utf-8")
    uncommented = re.sub(r"^# (\[\w+\].*|\w+ *=.*)$", r"\1", text, flags=re.M)
    job = write_job(tmp_path / "jobs" / "all.toml", uncommented)
    argv = job_argv(job)
    for flag in ("--system", "--top-p", "--seed", "--response-format", "--extra-body",
                 "--itpm", "--otpm", "--retries", "--read-timeout", "--max-image-bytes",
                 "--engine", "--ray-address", "--ray-actors", "--prompt", "--log-format",
                 "--n", "--stop", "--image-column", "--id-column", "--delimiter"):
        assert flag in argv, flag
    build_parser().parse_args(argv)


def test_a_job_sets_a_plain_prompt_log_format_n_and_stop(gateway, tmp_path, capfd) -> None:
    write_manifest(tmp_path / "m.csv", [{"id": "a", "image": img("ok", "a.jpg")}])
    job = write_job(tmp_path / "job.toml", f"""
manifest = "m.csv"
out = "out"
[api]
base_url = "{gateway.base_url}"
prompt = "Only this prompt."
n = 1
stop = ["END", "STOP"]
extra_body = {{top_k = 40}}
[output]
log_format = "json"
""")
    code, stdout, err = main_run(capfd, "run", str(job), *FAST)
    assert code == 0, err
    (call,) = gateway.calls()
    assert call.prompt_text == "Only this prompt."
    assert call.body["stop"] == ["END", "STOP"] and call.body["top_k"] == 40
    assert json.loads(lines(stdout)[-1])["event"] == "summary"


@pytest.mark.parametrize("body,fix", [
    ("[limits]\nconcurency = 4\n", "did you mean [limits] concurrency?"),
    ("[api]\nconcurrency = 4\n", "belongs in [limits]: [limits] concurrency"),
    ('model = "x"\n', "belongs in [api]: [api] model"),
    ("[limit]\nconcurrency = 4\n", "did you mean [limits]?"),
    ('[api]\napi = "opnai"\n', "did you mean 'openai'?"),
    ("price_in = 3\n", "[price] input"),
])
def test_a_mistyped_job_key_names_the_fix(tmp_path, capfd, body, fix) -> None:
    job = write_job(tmp_path / "job.toml", f'manifest = "m.csv"\n{body}')
    code, _, err = main_run(capfd, "run", str(job))
    assert code == 2
    (line,) = lines(err)
    assert str(job) in line and fix in line, line
