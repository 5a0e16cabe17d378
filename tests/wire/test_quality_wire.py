"""The quality gate against the bundled simulator over real loopback HTTP (7-byte pieces).

The simulator answers scripted captions on prompt triggers (pipeline/simulator/
scripted.py): each check catches its case, a near miss passes, a failed caption is
re-asked exactly once as a follow-up turn carrying the previous answer, and the
outcome (flags, re-ask count and cost, policy) is in the row.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from conftest import SAMPLES

from pipeline.simulator.app import SimConfig
from pipeline.simulator.scripted import REPEATED
from pipeline.simulator.thread import SimThread

ROW = [{"id": "camera", "image": str(SAMPLES / "camera.png")}]
ROWS = [{"id": n, "image": str(SAMPLES / f"{n}.png")} for n in ("camera", "coffee", "horse")]


@pytest.fixture(scope="module")
def sim() -> Iterator[SimThread]:
    server = SimThread(SimConfig(latency=0, tokens_per_second=0, split_bytes=7))
    try:
        yield server
    finally:
        server.stop()


def run(caption: Any, sim: SimThread, prompt: str, *args: str, rows: Any = None,
        api: str = "openai") -> Any:
    sim.stats.bodies.clear()
    path = "v1beta" if api == "gemini" else "v1"
    return caption(rows or ROW, "--api", api, "--prompt", prompt, "--price-in", "3",
                   "--price-out", "15", *args, base_url=f"http://127.0.0.1:{sim.port}/{path}",
                   concurrency=1)


CASES = [
    ("[soft-refuse]", (), "refusal", "declined the task"),
    ("[soft-refuse:de]", (), "refusal", "declined the task"),
    ("[soft-refuse:zh]", (), "refusal", "declined the task"),
    ("[long]", ("--quality-max-words", "60"), "too_long", "answer in at most 60"),
    ("[lang:fr]", ("--quality-language", "en"), "language", "was in French"),
    ("[boilerplate]", (), "boilerplate", "caption text only"),
]


@pytest.mark.parametrize("trigger,args,flag,said", CASES, ids=[c[0] for c in CASES])
def test_a_failed_check_is_reasked_once_with_the_previous_answer(
        caption: Any, sim: SimThread, trigger: str, args: tuple[str, ...], flag: str,
        said: str) -> None:
    res = run(caption, sim, f"Describe the image. {trigger}", *args)
    row = res.row("camera")
    assert res.code == 0, res.stderr
    assert (row["status"], row["reasks"], row["reask_flags"], row["quality_flags"]) == \
        ("ok", 1, [flag], [])
    assert row["attempts"] == 2 and len(sim.stats.bodies) == 2
    first, second = sim.stats.bodies
    assert len(first["messages"]) == 1
    answer, follow_up = second["messages"][1:]
    assert answer["role"] == "assistant" and answer["content"] != row["caption"]
    assert follow_up["role"] == "user" and said in follow_up["content"]
    assert 0 < row["reask_cost_usd"] < row["cost_usd"]


def test_a_near_miss_passes_without_a_reask(caption: Any, sim: SimThread) -> None:
    res = run(caption, sim, "Describe the image. [near-miss]")
    row = res.row("camera")
    assert "Sorry, we can't help you today" in row["caption"]
    assert (row["reasks"], row["quality_flags"], len(sim.stats.bodies)) == (0, [], 1)


def test_the_same_text_for_many_images_is_flagged_past_max_repeats(
        caption: Any, sim: SimThread) -> None:
    res = run(caption, sim, "Describe the image. [repeat]", "--quality-max-repeats", "1",
              rows=ROWS)
    rows = [res.row(r["id"]) for r in ROWS]
    kept = [r for r in rows if r["reasks"] == 0]
    assert len(kept) == 1 and kept[0]["caption"] == REPEATED
    for r in rows:
        if r["reasks"]:
            assert r["reask_flags"] == ["repeated"] and r["caption"] != REPEATED
    assert len(sim.stats.bodies) == 5  # three images, two re-asked once


def test_a_caption_still_failing_after_the_reask_is_flagged_by_default(
        caption: Any, sim: SimThread) -> None:
    res = run(caption, sim, "Describe the image. [long!]", "--quality-max-words", "60")
    row = res.row("camera")
    assert (res.code, row["status"], row["reasks"], row["quality_flags"]) == \
        (0, "ok", 1, ["too_long"])
    assert "after one re-ask" in row["quality_notes"]
    assert "quality: re-asked=1 ($" in res.stdout and "flagged too_long=1" in res.stdout


def test_policy_error_makes_it_an_error_row_that_keeps_its_caption(
        caption: Any, sim: SimThread) -> None:
    res = run(caption, sim, "Describe the image. [long!]", "--quality-max-words", "60",
              "--quality-policy", "error")
    row = res.row("camera")
    assert (res.code, row["status"], row["error_class"]) == (1, "error", "quality")
    assert "too_long" in row["error"] and len(row["caption"].split()) > 60


def test_without_reask_the_caption_is_flagged_after_one_request(
        caption: Any, sim: SimThread) -> None:
    res = run(caption, sim, "Describe the image. [soft-refuse]", "--no-quality-reask")
    row = res.row("camera")
    assert (row["reasks"], row["quality_flags"], len(sim.stats.bodies)) == (0, ["refusal"], 1)


def test_the_refusal_check_can_be_turned_off(caption: Any, sim: SimThread) -> None:
    res = run(caption, sim, "Describe the image. [soft-refuse]", "--no-quality-refusal")
    row = res.row("camera")
    assert (row["status"], row["reasks"], row["quality_flags"]) == ("ok", 0, [])


def _turns(api: str, body: dict[str, Any]) -> list[tuple[str, str]]:
    """(role, text) of each turn after the first, in the protocol's own shape."""
    if api == "anthropic":
        return [(m["role"], m["content"][0]["text"]) for m in body["messages"][1:]]
    if api == "responses":
        return [(m["role"], m["content"][0]["text"]) for m in body["input"][1:]]
    return [(c["role"], c["parts"][0]["text"]) for c in body["contents"][1:]]


@pytest.mark.parametrize("api,model_role", [("anthropic", "assistant"),
                                            ("responses", "assistant"), ("gemini", "model")])
def test_every_protocol_carries_the_reask_as_a_turn_of_its_own(
        caption: Any, sim: SimThread, api: str, model_role: str) -> None:
    res = run(caption, sim, "Describe the image. [soft-refuse]", api=api)
    row = res.row("camera")
    assert res.code == 0, res.stderr
    assert (row["reasks"], row["reask_flags"], row["quality_flags"]) == (1, ["refusal"], [])
    (role, answer), (user, instruction) = _turns(api, sim.stats.bodies[1])
    assert (role, user) == (model_role, "user")
    assert answer.startswith("I'm sorry, but I can't") and "declined" in instruction


def test_status_counts_the_flags_and_the_reasks(caption: Any, sim: SimThread) -> None:
    from pipeline.commands.status import main as status

    run(caption, sim, "Describe the image. [long!]", "--quality-max-words", "60", rows=ROWS)
    caption.capfd.readouterr()
    assert status([str(caption.out)]) == 0
    line = next(ln for ln in caption.capfd.readouterr().out.splitlines()
                if ln.startswith("quality:"))
    assert line.startswith("quality: 3 rows flagged (too_long=3); 3 re-asked ($")
    assert line.endswith("0 of them passed after the re-ask")
