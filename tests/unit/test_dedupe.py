"""Specification of dedupe (images/dedupe.py): each distinct image is captioned once.

A key's first claimer captions it; a claim while it is in flight waits for it; an ok
result is copied, a failed one lets the next claimer try for itself. Results of this
run live in a bounded table; what OUT already holds is found by ``ImageIndex``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from runkit import ok

from pipeline.images import dedupe as dedupe_module
from pipeline.images.dedupe import Dedupe, ImageIndex, dedup_key
from pipeline.records import ManifestRow, Original, ResultRow, error_row

KEY = dedup_key("ab" * 32, "Caption it.", None, "m")


def row(rid: str) -> ManifestRow:
    return ManifestRow(rid, f"{rid}.png", None, 2, {})


def captioned(rid: str) -> ResultRow:
    return ok(row(rid))


def failure(rid: str) -> ResultRow:
    return error_row(row(rid), "HTTP 503", "server", attempts=6)


async def turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


# --------------------------------------------------------------------------- the key


def test_the_key_is_the_same_for_the_same_image_prompt_system_and_model() -> None:
    assert dedup_key("ab" * 32, "Caption it.", None, "m") == KEY
    assert len(KEY) == 32 and int(KEY, 16) >= 0


@pytest.mark.parametrize("other", [
    ("cd" * 32, "Caption it.", None, "m"), ("ab" * 32, "Describe it.", None, "m"),
    ("ab" * 32, "Caption it.", "Be terse.", "m"), ("ab" * 32, "Caption it.", None, "m2"),
])
def test_another_image_prompt_system_or_model_is_another_key(
        other: tuple[str, str, str | None, str]) -> None:
    assert dedup_key(*other) != KEY


# --------------------------------------------------------------------------- claims


async def test_the_first_claim_captions_the_key() -> None:
    assert await Dedupe().claim(KEY) is None


async def test_a_claim_after_an_ok_result_copies_it() -> None:
    d = Dedupe()
    await d.claim(KEY)
    d.resolve(KEY, captioned("first"))
    original = await d.claim(KEY)
    assert original == Original.of(captioned("first")) and d.copies == 1


async def test_a_claim_while_the_original_is_in_flight_waits_for_it() -> None:
    d = Dedupe()
    await d.claim(KEY)
    waiting = asyncio.create_task(d.claim(KEY))
    await turns()
    assert not waiting.done()
    d.resolve(KEY, captioned("first"))
    assert (await waiting).id == "first"  # type: ignore[union-attr]


async def test_a_failed_original_lets_a_waiting_duplicate_caption_it_itself() -> None:
    d = Dedupe()
    await d.claim(KEY)
    second = asyncio.create_task(d.claim(KEY))
    await turns()
    d.resolve(KEY, failure("first"))
    assert await second is None and d.copies == 0  # the duplicate now owns the key
    third = asyncio.create_task(d.claim(KEY))
    await turns()
    assert not third.done()  # ... and the next one waits for it
    d.resolve(KEY, captioned("second"))
    assert (await third).id == "second"  # type: ignore[union-attr]


async def test_an_original_that_never_finished_lets_a_duplicate_try() -> None:
    d = Dedupe()
    await d.claim(KEY)
    waiting = asyncio.create_task(d.claim(KEY))
    await turns()
    d.resolve(KEY, None)  # cancelled: the run stopped mid-request
    assert await waiting is None


async def test_a_key_in_out_is_copied_without_a_claim() -> None:
    asked: list[str] = []

    def lookup(key: str) -> Original | None:
        asked.append(key)
        return Original("earlier", "A caption from an earlier run.")

    d = Dedupe(lookup)
    assert (await d.claim(KEY)).id == "earlier"  # type: ignore[union-attr]
    assert asked == [KEY] and d.copies == 1


async def test_the_table_of_this_runs_results_is_bounded(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    monkeypatch.setattr(dedupe_module, "_RECENT_MAX", 2)
    d = Dedupe()
    keys = [dedup_key(f"{i:064x}", "p", None, "m") for i in range(3)]
    for i, key in enumerate(keys):
        await d.claim(key)
        d.resolve(key, captioned(f"r{i}"))
    assert await d.claim(keys[0]) is None  # the oldest was forgotten: captioned again
    assert (await d.claim(keys[2])).id == "r2"  # type: ignore[union-attr]


async def test_a_copy_keeps_its_key_in_the_bounded_table_longest(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dedupe_module, "_RECENT_MAX", 2)
    d = Dedupe()
    a, b, c = (dedup_key(f"{i:064x}", "p", None, "m") for i in range(3))
    for key, rid in ((a, "a"), (b, "b")):
        await d.claim(key)
        d.resolve(key, captioned(rid))
    await d.claim(a)  # a copy of a: a is now the most recently used
    await d.claim(c)
    d.resolve(c, captioned("c"))
    assert await d.claim(b) is None and (await d.claim(a)) is not None


# --------------------------------------------------------------------------- OUT's index


def part(path: Path, rows: list[dict[str, str | None]]) -> Path:
    cols = ["id", "dedup_key", "status", "caption", "finish_reason", "finish_reason_raw",
            "model", "response_id", "terminal"]
    table = pa.table({c: pa.array([r.get(c) for r in rows], pa.string()) for c in cols})
    pq.write_table(table, path)
    return path


def test_the_index_finds_the_ok_row_of_a_key(tmp_path: Path) -> None:
    index = ImageIndex([part(tmp_path / "p.parquet", [
        {"id": "a", "dedup_key": KEY, "status": "ok", "caption": "A cat."}])])
    found = index.lookup(KEY)
    assert found is not None and (found.id, found.caption) == ("a", "A cat.")


def test_the_index_holds_no_error_rows(tmp_path: Path) -> None:
    index = ImageIndex([part(tmp_path / "p.parquet", [
        {"id": "a", "dedup_key": KEY, "status": "error"}])])
    assert len(index) == 0 and index.lookup(KEY) is None


def test_keys_that_share_the_indexed_prefix_are_told_apart(tmp_path: Path) -> None:
    twin = KEY[:16] + "0" * 16 if KEY[16:] != "0" * 16 else KEY[:16] + "1" * 16
    index = ImageIndex([part(tmp_path / "p.parquet", [
        {"id": "twin", "dedup_key": twin, "status": "ok", "caption": "Another image."},
        {"id": "a", "dedup_key": KEY, "status": "ok", "caption": "A cat."}])])
    assert index.lookup(KEY).id == "a"  # type: ignore[union-attr]
    assert index.lookup(twin).id == "twin"  # type: ignore[union-attr]


def test_a_part_written_before_images_were_keyed_is_skipped(tmp_path: Path) -> None:
    old = tmp_path / "old.parquet"
    pq.write_table(pa.table({"id": ["a"], "status": ["ok"]}), old)
    assert len(ImageIndex([old])) == 0
