"""Chained prompts: ordering, references, and filling a row from its upstream captions
(sources/chain.py, run/chain.py, store/captions.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import RunFatal
from pipeline.records import ManifestRow, ResultRow, Status
from pipeline.run.chain import Chain, caption_hash
from pipeline.settings import Secret, Settings
from pipeline.sources.chain import marker, order, refs
from pipeline.sources.plan import NamedPrompt, variants
from pipeline.store.captions import CaptionIndex
from pipeline.wire.options import template_fields

TAGS = NamedPrompt("tags", "List tags.")
LONG = NamedPrompt("long", "A long caption using {caption.tags}, about {category}.")
SHORT = NamedPrompt("short", "Shorten: {caption.long}")
ROW = ManifestRow("a", "a.png", None, 2, {"category": "pets"})


def test_prompts_are_ordered_after_the_captions_they_use() -> None:
    assert [p.name for p in order([SHORT, LONG, TAGS])] == ["tags", "long", "short"]
    plain = NamedPrompt("plain", "Describe.")
    assert [p.name for p in order([plain, TAGS])] == ["plain", "tags"]  # else as given


def test_a_reference_to_an_unknown_prompt_names_the_closest() -> None:
    with pytest.raises(RunFatal, match=r"no prompt named 'tag'; did you mean \{caption.tags\}"):
        order([TAGS, NamedPrompt("long", "Use {caption.tag}.")])


def test_a_cycle_is_a_config_error_naming_it() -> None:
    a, b = NamedPrompt("a", "{caption.b}"), NamedPrompt("b", "{caption.a}")
    with pytest.raises(RunFatal, match="a -> b -> a"):
        order([a, b])


@pytest.mark.parametrize("use", ["{caption.tags:.200}", "{caption.tags!r}", "{caption.tags:>80}"])
def test_a_caption_reference_with_a_format_spec_is_a_config_error(use: str) -> None:
    # The planner would format the marker, not the caption: the model would get it.
    with pytest.raises(RunFatal, match="takes no conversion or format spec") as e:
        order([TAGS, NamedPrompt("long", f"Use {use}.")])
    assert e.value.exit_code == 2


def test_references_are_read_once_each_and_pass_the_template_check() -> None:
    assert refs("{caption.x} and {caption.x}, {caption.y} {id}") == ("x", "y")
    assert template_fields(LONG.template) == ["caption.tags", "category"]


def test_the_planner_renders_columns_now_and_leaves_a_marker_for_each_caption() -> None:
    rows = list(variants(ROW, order([SHORT, LONG, TAGS])))
    assert rows[1].prompt == f"A long caption using {marker('tags')}, about pets."


def test_a_plain_caption_column_is_still_the_manifests_own() -> None:
    row = ManifestRow("a", "a.png", None, 2, {"caption": "old text"})
    rendered = next(variants(row, [NamedPrompt("fix", "Improve: {caption}")]))
    assert rendered.prompt == "Improve: old text"


def test_chains_run_on_the_local_engine_and_the_online_lane_only(tmp_path: Path) -> None:
    prompts = (("tags", TAGS.template), ("long", LONG.template))
    base = {"manifest": tmp_path / "m.csv", "out": tmp_path / "o",
            "base_url": "http://127.0.0.1:1/v1", "api_key": Secret("k"), "prompts": prompts}
    assert Settings(**base).chained  # type: ignore[arg-type]
    with pytest.raises(RunFatal, match="local engine"):
        Settings(**base, engine="ray")  # type: ignore[arg-type]


def ok(name: str, caption: str) -> ResultRow:
    return ResultRow(id="a", prompt_name=name, status=Status.OK, caption=caption)


async def test_a_row_is_filled_from_its_images_earlier_rows_and_records_them() -> None:
    chain = Chain(order([TAGS, LONG]), None)
    row = list(variants(ROW, order([TAGS, LONG])))[1]
    filled, failed, upstream = await chain.fill(row, {"tags": ok("tags", "dog, couch")})
    assert failed is None and filled is not None
    assert filled.prompt == "A long caption using dog, couch, about pets."
    assert json.loads(upstream or "") == {"tags": caption_hash("dog, couch")}


async def test_an_upstream_without_a_caption_makes_an_upstream_error_row() -> None:
    chain = Chain(order([TAGS, LONG]), None)
    row = list(variants(ROW, order([TAGS, LONG])))[1]
    failed_tags = ResultRow(id="a", prompt_name="tags", error="refused", error_class="refused")
    _, failed, _ = await chain.fill(row, {"tags": failed_tags})
    assert failed is not None and failed.error_class == "upstream"
    assert "{caption.tags}" in (failed.error or "")
    _, missing, _ = await chain.fill(row, {})
    assert missing is not None and missing.error_class == "upstream"


async def test_an_upstream_finished_in_an_earlier_run_is_read_from_out(tmp_path: Path) -> None:
    part = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({"id": ["a", "a", "b"], "prompt_name": ["tags", "long", "tags"],
                             "status": ["ok", "ok", "error"],
                             "caption": ["dog, couch", "x", None]}), part)
    index = CaptionIndex([part], ["tags"])
    assert len(index) == 1  # only the ok rows of prompts others use
    assert index.lookup("a", "tags") == "dog, couch" and index.lookup("b", "tags") is None
    chain = Chain(order([TAGS, LONG]), index)
    row = list(variants(ROW, order([TAGS, LONG])))[1]
    filled, _, _ = await chain.fill(row, {})
    assert filled is not None and "dog, couch" in (filled.prompt or "")


async def test_a_runaway_upstream_caption_is_pasted_only_in_part() -> None:
    from pipeline.run.chain import UPSTREAM_CHARS

    chain = Chain(order([TAGS, LONG]), None)
    row = list(variants(ROW, order([TAGS, LONG])))[1]
    huge = "dog, " * 100_000
    filled, _, upstream = await chain.fill(row, {"tags": ok("tags", huge)})
    assert filled is not None and len(filled.prompt or "") < UPSTREAM_CHARS + 200
    assert json.loads(upstream or "") == {"tags": caption_hash(huge)}
