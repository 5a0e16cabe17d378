"""The ``--quality-*`` options of ``caption`` (a job file's ``[quality]`` table)."""

from __future__ import annotations

import argparse

from ..quality import QualitySettings, load_schema
from ..quality.config import POLICIES

__all__ = ["add_quality_args", "quality_from_args"]


def add_quality_args(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    on = argparse.BooleanOptionalAction
    a("--quality-refusal", action=on, default=True,
      help="flag captions that are a refusal or deflection in the text itself (\"I'm "
           "sorry, but I can't ...\"; sentence-aware, 10 languages; default on)")
    a("--quality-boilerplate", action=on, default=True,
      help="flag captions that are a placeholder or wrapped in chat (\"Here is a "
           "caption:\", \"Let me know if ...\"; default on)")
    a("--quality-min-words", type=int, metavar="N", help="flag captions under N words")
    a("--quality-max-words", type=int, metavar="N", help="flag captions over N words")
    a("--quality-min-chars", type=int, metavar="N", help="flag captions under N characters")
    a("--quality-max-chars", type=int, metavar="N", help="flag captions over N characters")
    a("--quality-banned-phrase", action="append", default=[], metavar="TEXT",
      help="flag captions that use this phrase (repeatable; case and spacing ignored)")
    a("--quality-language", metavar="ISO",
      help="flag captions confidently detected in another language (ISO 639-1: en, de, "
           "...; py3langid)")
    a("--quality-json-schema", metavar="SCHEMA.json",
      help="flag captions whose JSON (caption_json, else the caption) breaks this schema")
    a("--quality-max-repeats", type=int, metavar="N",
      help="flag a caption text already given for N other images (this run and OUT)")
    a("--quality-policy", choices=list(POLICIES), default="flag",
      help="a caption that still fails after the re-ask: ok with quality_flags (flag, "
           "default) or an error row of class quality (error)")
    a("--quality-reask", action=on, default=True,
      help="re-ask once, as a follow-up turn with the previous answer and what was "
           "wrong, before the policy applies (default on; priced like any request)")


def quality_from_args(ns: argparse.Namespace) -> QualitySettings:
    return QualitySettings(
        refusal=ns.quality_refusal, boilerplate=ns.quality_boilerplate,
        min_words=ns.quality_min_words, max_words=ns.quality_max_words,
        min_chars=ns.quality_min_chars, max_chars=ns.quality_max_chars,
        banned_phrases=tuple(ns.quality_banned_phrase), language=ns.quality_language,
        json_schema=load_schema(ns.quality_json_schema),
        json_schema_path=ns.quality_json_schema, max_repeats=ns.quality_max_repeats,
        policy=ns.quality_policy, reask=ns.quality_reask)
