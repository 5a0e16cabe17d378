"""The quality gate's checks, one caption text at a time: each catches its case and lets
its near miss through (pipeline/quality, docs/protocol.md §19)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import RunFatal
from pipeline.quality import Gate, QualitySettings, RepeatCounter, load_schema
from pipeline.quality.refusal import find_refusal, word_count
from pipeline.wire.options import MAX_SCHEMA_BYTES, load_response_format, load_tool_schema

CAPTION = "A brown dog sleeps on a red couch next to a sunny window in a small living room."

REFUSALS = [
    "I don't feel comfortable describing this image.",
    "I won't be describing the people in this photo.",
    "I apologize, but I cannot provide a description of this image as it may contain "
    "sensitive content.",
    "I'm sorry, I don't have the ability to view images.",
    "I'm sorry, but I can't help with that.",
    "Sorry, I cannot identify people in images.",
    "I'm unable to view images.",
    "As an AI language model, I can't see pictures.",
    "I can't assist with that request.",
    "There is no image provided in your message. Please upload one.",
    "I must respectfully decline this request.",
    "Es tut mir leid, aber ich kann bei diesem Bild nicht helfen.",
    "Je suis désolé, mais je ne peux pas décrire cette image.",
    "Lo siento, pero no puedo describir esta imagen.",
    "Mi dispiace, ma non posso descrivere questa immagine.",
    "Desculpe, mas não posso descrever esta imagem.",
    "Извините, но я не могу описать это изображение.",
    "抱歉，我无法描述这张图片。",
    "申し訳ありませんが、この画像を説明することはできません。",
    # Typographic apostrophes, as models often write them.
    "I’m sorry, but I can’t help with that.",
    "I won’t be able to caption this image.",
    "I'd rather not describe this image.",
    # German verb-second order; Romance verbs with their object as a suffix.
    "Leider kann ich bei dieser Anfrage nicht helfen.",
    "Ich kann leider keine Beschreibung dieses Bildes liefern.",
    "No puedo ayudarte con eso.",
    "Non posso aiutarti con questa richiesta.",
    "Desculpe, não consigo ajudá-lo com isso.",
]
NEAR_MISSES = [
    "I'm not able to identify people by their faces, but this image shows a woman in a red "
    "dress standing in a walled garden with roses behind her.",
    "Protesters hold signs reading 'I can't breathe' on a crowded city street at dusk.",
    "A book titled I Can't Help Falling in Love lies open on a wooden table by a window.",
    "I'm sorry to see the broken vase on the kitchen floor, shattered into many pieces.",
    'A shop sign reads "Sorry, we cannot help you today" above a closed wooden door.',
    "A hand-painted sign saying I cannot help myself hangs in a bakery window.",
    "I can't identify the person, but the photo shows a man in a blue suit standing on "
    "a stage in front of a large flag.",
    "Unfortunately, the image is blurry, but it shows a cat on a windowsill in the sun.",
    "As an AI-generated artwork, the picture shows a castle floating above clouds at dusk.",
    "Als KI-generiertes Bild zeigt es eine Burg über den Wolken in der Abenddämmerung.",
    "A shop’s sign says ‘Sorry, we can’t help you today’ in red letters.",
    CAPTION,
]


@pytest.mark.parametrize("text", REFUSALS)
def test_a_refusal_in_the_text_is_found_in_any_of_its_languages(text: str) -> None:
    assert find_refusal(text) is not None


@pytest.mark.parametrize("text", NEAR_MISSES)
def test_refusal_like_words_in_a_real_description_are_not_a_refusal(text: str) -> None:
    assert find_refusal(text) is None


def test_cjk_characters_count_as_words() -> None:
    assert word_count("一只狗 sleeps here") == 5


def flags(text: str, caption_json: str | None = None, **q: object) -> tuple[str, ...]:
    return Gate(QualitySettings(**q)).judge("default", text, caption_json).names  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["", "   ", "N/A", "[caption]", "Here is a caption:",
                                  "An image.", "\u200b", "\ufeff", "\u2014", "\U0001f600",
                                  "· · ·", "```\n```", "Here is a caption: \u2014"])
def test_empty_or_placeholder_text_is_boilerplate(text: str) -> None:
    assert flags(text) == ("boilerplate",)


@pytest.mark.parametrize("text", [f"Sure! Here is a caption for the image: {CAPTION}",
                                  f"{CAPTION} Let me know if you need anything else."])
def test_a_caption_wrapped_in_chat_is_boilerplate(text: str) -> None:
    assert flags(text) == ("boilerplate",)


def test_a_plain_caption_passes_the_default_checks() -> None:
    assert flags(CAPTION) == ()
    assert flags("Here, a dog sleeps on a couch by the window.") == ()


def test_word_bounds_are_measured_and_said_in_the_reask() -> None:
    gate = Gate(QualitySettings(max_words=10))
    verdict = gate.judge("default", CAPTION)
    assert verdict.names == ("too_long",)
    n = word_count(CAPTION)
    assert verdict.instruction == f"Your answer was {n} words; answer in at most 10."
    assert flags(CAPTION, max_words=word_count(CAPTION)) == ()  # exactly the bound: passes
    assert flags("A dog.", min_words=5) == ("too_short",)


def test_character_bounds() -> None:
    assert flags(CAPTION, max_chars=40) == ("too_long",)
    assert flags(CAPTION, min_chars=len(CAPTION)) == ()


def test_banned_phrases_match_whole_words_ignoring_case_and_spacing() -> None:
    assert flags("The  IMAGE shows a dog on a couch.", banned_phrases=("the image shows",)) \
        == ("banned_phrase",)
    assert flags("A dog shows off on a couch.", banned_phrases=("the image shows",)) == ()
    assert flags("A catalogue on a table.", banned_phrases=("cat",)) == ()


def test_a_caption_in_another_language_is_flagged_only_when_the_detector_is_sure() -> None:
    french = "Un chien brun dort sur un canapé rouge près d'une fenêtre ensoleillée."
    verdict = Gate(QualitySettings(language="en")).judge("default", french)
    assert verdict.names == ("language",)
    assert "answer in English" in verdict.instruction
    assert flags(CAPTION, language="en") == ()
    assert flags("Croissant on a plate.", language="en") == ()  # too short to tell
    assert flags("Un chien dort.", language="fr") == ()


def test_an_unknown_language_code_is_a_config_error() -> None:
    with pytest.raises(RunFatal, match="xx"):
        QualitySettings(language="xx")


def test_json_schema_checks_caption_json(tmp_path: Path) -> None:
    schema = {"type": "object", "required": ["caption", "tags"],
              "properties": {"tags": {"type": "array", "maxItems": 3}}}
    q = {"json_schema": schema, "refusal": False, "boilerplate": False}
    good = json.dumps({"caption": "a dog", "tags": ["dog"]})
    assert flags(good, good, **q) == ()
    bad = json.dumps({"caption": "a dog", "tags": ["a", "b", "c", "d"]})
    verdict = Gate(QualitySettings(**q)).judge("default", bad, bad)  # type: ignore[arg-type]
    assert verdict.names == ("json_schema",) and "tags" in verdict.notes
    assert flags("not json", None, **q) == ("json_schema",)


def test_a_schema_file_that_is_no_schema_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text('{"type": 12}')
    with pytest.raises(RunFatal, match="not a valid JSON Schema"):
        load_schema(str(path))
    path.write_text("{")
    with pytest.raises(RunFatal, match="not JSON"):
        load_schema(str(path))


LOADERS = [(load_schema, "--quality-json-schema"), (load_tool_schema, "--tool-schema"),
           (load_response_format, "--response-format")]


@pytest.mark.parametrize("load,option", LOADERS, ids=[o for _, o in LOADERS])
def test_a_schema_path_that_is_no_small_json_file_is_one_line_exit_2(
        tmp_path: Path, load: Callable[[str], object], option: str) -> None:
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)  # no writer: an open() that blocks would hang here
    huge = tmp_path / "huge.json"
    huge.write_text(" " * (MAX_SCHEMA_BYTES + 1))
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    for path, said in ((fifo, "not a regular file"), ("/dev/zero", "not a regular file"),
                       (huge, "over 1 MiB"), (deep, "JSON")):
        with pytest.raises(RunFatal, match=said) as e:
            load(str(path))
        assert e.value.exit_code == 2 and option in str(e.value)


def test_several_failed_checks_make_one_instruction_listing_each() -> None:
    verdict = Gate(QualitySettings(max_words=5, banned_phrases=("couch",))).judge(
        "default", CAPTION)
    assert verdict.names == ("too_long", "banned_phrase")
    assert verdict.instruction.count("\n- ") == 2


def test_repeats_count_other_images_per_prompt_and_past_the_bound() -> None:
    gate = Gate(QualitySettings(max_repeats=2))
    for _ in range(2):
        assert gate.judge("default", CAPTION).ok
        gate.keep("default", CAPTION)
    assert gate.judge("default", CAPTION.upper() + "  ").names == ("repeated",)
    assert gate.judge("short", CAPTION).ok  # another prompt counts apart


def test_repeats_start_from_the_ok_captions_out_holds_not_its_copies(tmp_path: Path) -> None:
    part = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({
        "caption": [CAPTION, CAPTION, CAPTION, None],
        "status": ["ok", "ok", "error", "ok"],
        "prompt_name": ["default"] * 4,
        "dedup_of": [None, "a", None, None]}), part)
    counter = RepeatCounter()
    counter.add_parts([part])
    assert counter.seen("default", CAPTION) == 1


def test_the_repeat_counter_forgets_single_texts_at_its_cap() -> None:
    counter = RepeatCounter(cap=3)
    counter.add("default", "kept")
    counter.add("default", "kept")
    for text in ("a", "b", "c"):
        counter.add("default", text)
    assert len(counter) == 1 and counter.seen("default", "kept") == 2


@pytest.mark.parametrize("bad,match", [({"min_words": 0}, "1 or more"),
                                       ({"min_words": 9, "max_words": 3}, "above"),
                                       ({"policy": "drop"}, "flag or error"),
                                       ({"banned_phrases": (" ",)}, "empty phrase"),
                                       ({"banned_phrases": ("...",)}, "empty phrase")])
def test_bad_quality_settings_are_config_errors(bad: dict[str, object], match: str) -> None:
    with pytest.raises(RunFatal, match=match):
        QualitySettings(**bad)  # type: ignore[arg-type]


def test_a_runaway_caption_is_measured_whole_and_read_only_in_its_head() -> None:
    text = CAPTION + " " + "more words here " * 200_000  # ~3 MB
    verdict = Gate(QualitySettings(max_words=60, language="en")).judge("default", text)
    assert verdict.names == ("too_long",)
    assert f"{word_count(text)} words" in verdict.notes
