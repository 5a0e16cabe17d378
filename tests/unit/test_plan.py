"""Specification of the planner (sources/plan.py): which rows a run captions.

Manifest rows × named prompts, minus the keys OUT holds, minus repeated ids, up to
``--limit``; a known id given another image stops the run, judged on its first line.
The manifests are real CSV files; "done" is a real ``KeySet`` of key hashes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import RunFatal
from pipeline.keys import ImageRefs, KeySet, hash_strings, key_hash
from pipeline.sources.manifest import Manifest
from pipeline.sources.plan import NamedPrompt, Plan, PlanCounts

DEFAULT = (NamedPrompt("default", "Caption it."),)
TWO = (NamedPrompt("short", "One line about {id}."), NamedPrompt("long", "Describe {colour}."))


def manifest(tmp_path: Path, lines: list[str], header: str = "id,image") -> Manifest:
    path = tmp_path / "m.csv"
    path.write_text("\n".join([header, *lines]) + "\n")
    return Manifest(path)


def done(*keys: tuple[str, str]) -> KeySet:
    keys_ = KeySet()
    for rid, prompt in keys:
        keys_.add(key_hash(rid, prompt))
    return keys_


def refs(*pairs: tuple[str, str]) -> ImageRefs:
    """What OUT holds: which image each id was captioned from."""
    ids = hash_strings((rid for rid, _ in pairs), len(pairs))
    images = hash_strings((image for _, image in pairs), len(pairs))
    return ImageRefs([ids], [images])


def keys(plan: Plan) -> list[tuple[str, str]]:
    return [row.key for group in plan for row in group]


def test_each_row_is_planned_once_per_named_prompt_in_one_group(tmp_path: Path) -> None:
    plan = Plan(manifest(tmp_path, ["a,a.png,red", "b,b.png,blue"], "id,image,colour"),
                KeySet(), TWO, None)
    groups = [g for g in plan if g]
    assert [[r.key for r in g] for g in groups] == [[("a", "short"), ("a", "long")],
                                                   [("b", "short"), ("b", "long")]]


def test_a_prompt_is_rendered_from_the_rows_columns(tmp_path: Path) -> None:
    plan = Plan(manifest(tmp_path, ["a,a.png,red"], "id,image,colour"), KeySet(), TWO, None)
    assert [r.prompt for g in plan for r in g] == ["One line about a.", "Describe red."]


def test_the_manifests_prompt_column_wins_for_the_default_prompt(tmp_path: Path) -> None:
    plan = Plan(manifest(tmp_path, ["a,a.png,Name the bird.", "b,b.png,"], "id,image,prompt"),
                KeySet(), DEFAULT, None)
    assert [r.prompt for g in plan for r in g] == ["Name the bird.", "Caption it."]


def test_keys_done_are_skipped_and_counted(tmp_path: Path) -> None:
    counts = PlanCounts()
    plan = Plan(manifest(tmp_path, ["a,a.png", "b,b.png", "c,c.png"]),
                done(("a", "default"), ("c", "default")), DEFAULT, None, counts)
    assert keys(plan) == [("b", "default")]
    assert (counts.skipped_done, counts.pending) == (2, 1)


def test_only_the_prompts_not_done_of_a_row_are_planned(tmp_path: Path) -> None:
    plan = Plan(manifest(tmp_path, ["a,a.png,red"], "id,image,colour"),
                done(("a", "short")), TWO, None)
    assert keys(plan) == [("a", "long")]


def test_a_repeated_id_is_skipped_and_the_first_line_kept(tmp_path: Path) -> None:
    counts = PlanCounts()
    plan = Plan(manifest(tmp_path, ["a,first.png", "b,b.png", "a,second.png"]), KeySet(),
                DEFAULT, None, counts)
    logged: list[int] = []
    plan.log_duplicate = lambda row: logged.append(row.line)
    assert [(r.id, r.image) for g in plan for r in g] == [("a", "first.png"), ("b", "b.png")]
    assert counts.skipped_duplicate == 1 and logged == [4]


def test_the_limit_caps_planned_rows_not_manifest_lines(tmp_path: Path) -> None:
    counts = PlanCounts()
    plan = Plan(manifest(tmp_path, ["a,a.png,red", "b,b.png,blue"], "id,image,colour"),
                KeySet(), TWO, 3, counts)
    assert keys(plan) == [("a", "short"), ("a", "long"), ("b", "short")]
    assert counts.pending == 3


def test_the_limit_counts_only_rows_still_pending(tmp_path: Path) -> None:
    plan = Plan(manifest(tmp_path, ["a,a.png", "b,b.png", "c,c.png"]),
                done(("a", "default")), DEFAULT, 1)
    assert keys(plan) == [("b", "default")]


def test_a_limit_of_0_plans_nothing(tmp_path: Path) -> None:
    assert keys(Plan(manifest(tmp_path, ["a,a.png"]), KeySet(), DEFAULT, 0)) == []


def test_an_unusable_line_is_planned_as_a_row_with_its_error(tmp_path: Path) -> None:
    (row,) = [r for g in Plan(manifest(tmp_path, ["a,"]), KeySet(), DEFAULT, None) for r in g]
    assert row.id == "a" and row.error is not None and row.prompt is None


def test_a_known_id_with_another_image_stops_the_plan_naming_the_line(
        tmp_path: Path) -> None:
    plan = Plan(manifest(tmp_path, ["b,b.png", "a,other.png"]), done(("a", "default")),
                DEFAULT, None, images=refs(("a", "a.png")), out=tmp_path / "out")
    with pytest.raises(RunFatal) as info:
        keys(plan)
    assert info.value.exit_code == 2
    assert "line 3: id 'a' is in" in info.value.message and "other.png" in info.value.message


def test_a_repeated_line_with_another_image_is_only_a_duplicate(tmp_path: Path) -> None:
    counts = PlanCounts()
    plan = Plan(manifest(tmp_path, ["a,a.png", "b,b.png", "a,other.png"]),
                done(("a", "default")), DEFAULT, None, counts, images=refs(("a", "a.png")))
    assert keys(plan) == [("b", "default")]  # judged by its first line, which agrees


def test_a_known_id_with_its_own_image_is_no_conflict(tmp_path: Path) -> None:
    plan = Plan(manifest(tmp_path, ["a,a.png"]), KeySet(), DEFAULT, None,
                images=refs(("a", "a.png")))
    assert keys(plan) == [("a", "default")]
