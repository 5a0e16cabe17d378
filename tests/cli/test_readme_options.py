"""The README's option tables and `caption --help` list the same options."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.commands.caption import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_options() -> set[str]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Options"):text.index("## Protocols")]
    first_cells = [line.split("|")[1] for line in section.splitlines()
                   if line.startswith("| `")]
    return {flag for cell in first_cells for flag in re.findall(r"`(-{1,2}[a-z][a-z-]*)", cell)}


def parser_options() -> set[str]:
    flags = set()
    for action in build_parser()._actions:
        flags.update(o for o in action.option_strings if o not in ("-h", "--help"))
    return flags


def test_every_help_option_is_in_the_readme() -> None:
    assert parser_options() - readme_options() - {"--verbose"} == set()


def test_the_readme_documents_no_option_that_does_not_exist() -> None:
    assert readme_options() - parser_options() == set()
