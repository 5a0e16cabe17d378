"""Every protocol against the bundled simulator, over real loopback HTTP, with every
event written in 7-byte pieces (``--split-bytes``: cuts inside lines, JSON and UTF-8).

The simulator speaks each dialect (docs/protocol.md §2, §3, §14, §15): the same manifest
gives the same keys and captions through all four, streamed or not; faults, sequence
gaps, tool calls cut by max_tokens, thinking models and refusals reach the rows by name.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SAMPLES

from pipeline.simulator.app import SimConfig
from pipeline.simulator.thread import SimThread

APIS = ("openai", "anthropic", "responses", "gemini")
ROWS = [{"id": n, "image": str(SAMPLES / f"{n}.png")} for n in ("camera", "coffee", "horse")]
TERMINAL = {"openai": "done", "anthropic": "message_stop", "responses": "completed",
            "gemini": "eof_after_finish"}


def _sim(**config: Any) -> Iterator[SimThread]:
    sim = SimThread(SimConfig(latency=0, tokens_per_second=0, split_bytes=7, **config))
    try:
        yield sim
    finally:
        sim.stop()


@pytest.fixture(scope="module")
def sim() -> Iterator[SimThread]:
    yield from _sim()


def base(sim: SimThread, api: str) -> str:
    return f"http://127.0.0.1:{sim.port}/{'v1beta' if api == 'gemini' else 'v1'}"


def run(caption: Any, sim: SimThread, api: str, *args: str, rows: Any = None,
        name: str | None = None, retries: int = 2) -> Any:
    caption.out = caption.tmp / (name or f"out-{api}")
    return caption(rows or ROWS, "--api", api, *args, base_url=base(sim, api),
                   retries=retries)


def test_the_same_manifest_gives_the_same_captions_through_every_protocol(
        caption: Any, sim: SimThread) -> None:
    captions: dict[str, dict[str, str]] = {}
    for api in APIS:
        for stream in (True, False):
            res = run(caption, sim, api, *([] if stream else ["--no-stream"]),
                      name=f"out-{api}-{stream}")
            assert res.code == 0, (api, stream, res.stderr)
            rows = {r["id"]: res.row(r["id"]) for r in ROWS}
            for row in rows.values():
                assert row["status"] == "ok" and row["finish_reason"] == "stop"
                assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0
                assert row["terminal"] == (TERMINAL[api] if stream else "json")
            captions[f"{api}/{'stream' if stream else 'json'}"] = {
                i: r["caption"] for i, r in rows.items()}
    reference = captions["openai/stream"]
    assert len(set(reference.values())) == len(ROWS)  # three images, three captions
    assert all(c == reference for c in captions.values()), captions


@pytest.mark.parametrize("api,cls", [("openai", "stream_error"), ("anthropic", "overloaded"),
                                     ("responses", "stream_error"),
                                     ("gemini", "stream_error")])
def test_an_error_event_mid_stream_is_retried_then_recorded(caption: Any, api: str,
                                                            cls: str) -> None:
    # Anthropic's in-stream error is overloaded_error: a rate-limit signal, bounded by
    # --max-rate-wait rather than --retries (README "Rate limits").
    for failing in _sim(fail_rate=1.0, fail_modes=("error_event",)):
        res = run(caption, failing, api, "--max-rate-wait", "0.2", rows=ROWS[:1], retries=1)
        row = res.row("camera")
        assert (res.code, row["status"], row["error_class"]) == (1, "error", cls)
        assert row["attempts"] == 2 if cls == "stream_error" else row["attempts"] >= 2


def test_a_responses_sequence_gap_is_counted_and_the_caption_kept(caption: Any,
                                                                  sim: SimThread) -> None:
    res = run(caption, sim, "responses", "--prompt", "[gap] Describe this image.")
    row = res.row("camera")
    assert row["status"] == "ok" and json.loads(row["quirks"]) == {"sequence_gap": 1}


@pytest.mark.parametrize("api", APIS)
def test_a_tool_call_gives_its_arguments_as_the_caption(caption: Any, sim: SimThread,
                                                        api: str, tmp_path: Path) -> None:
    schema = tmp_path / "caption.schema.json"
    schema.write_text('{"type": "object", "properties": {"caption": {"type": "string"}}}')
    res = run(caption, sim, api, "--tool-schema", str(schema), rows=ROWS[:1])
    row = res.row("camera")
    assert res.code == 0 and row["json_valid"] is True, res.stderr
    plain = run(caption, sim, "openai", rows=ROWS[:1], name="plain").row("camera")
    assert json.loads(row["caption_json"]) == {"caption": plain["caption"]}


@pytest.mark.parametrize("api", APIS)
def test_a_cut_inside_tool_arguments_is_invalid_json_retried(caption: Any, sim: SimThread,
                                                             api: str, tmp_path: Path) -> None:
    schema = tmp_path / "caption.schema.json"
    schema.write_text('{"type": "object"}')
    res = run(caption, sim, api, "--tool-schema", str(schema), "--max-tokens", "8",
              rows=ROWS[:1], retries=1)
    row = res.row("camera")
    assert (row["error_class"], row["attempts"], row["json_valid"]) == ("invalid_json", 2,
                                                                        False)


@pytest.mark.parametrize("api", APIS)
def test_tool_arguments_that_break_the_schema_are_invalid_json_retried(
        caption: Any, sim: SimThread, api: str, tmp_path: Path) -> None:
    # The simulator answers {"caption": "..."}; this schema also requires "tags".
    schema = tmp_path / "caption.schema.json"
    schema.write_text('{"type": "object", "required": ["caption", "tags"], '
                      '"properties": {"caption": {"type": "string"}, '
                      '"tags": {"type": "array"}}}')
    res = run(caption, sim, api, "--tool-schema", str(schema), rows=ROWS[:1], retries=1)
    row = res.row("camera")
    assert (row["error_class"], row["attempts"], row["json_valid"]) == ("invalid_json", 2,
                                                                        False)
    assert "does not match its schema" in row["error"] and "'tags'" in row["error"]


@pytest.mark.parametrize("api,reasoning", [("openai", 96), ("anthropic", None),
                                           ("responses", 96), ("gemini", 96)])
def test_a_thinking_model_at_a_small_max_tokens_gets_one_retry_with_more_room(
        caption: Any, sim: SimThread, api: str, reasoning: int | None) -> None:
    res = run(caption, sim, api, "--model", "sim-thinking", "--max-tokens", "60",
              rows=ROWS[:1])
    row = res.row("camera")
    assert (res.code, row["status"], row["attempts"]) == (0, "ok", 2), res.stderr
    assert row["reasoning_tokens"] == reasoning
    assert "Looking at the image" not in row["caption"]  # reasoning never in the caption


@pytest.mark.parametrize("api", ("openai", "responses", "gemini"))
def test_a_thinking_model_that_fills_the_larger_budget_too_is_an_error_row(
        caption: Any, sim: SimThread, api: str) -> None:
    res = run(caption, sim, api, "--model", "sim-thinking", "--reasoning-effort", "high",
              "--max-tokens", "40", rows=ROWS[:1])
    row = res.row("camera")
    assert (res.code, row["error_class"], row["attempts"]) == (1, "reasoning_exhausted", 2)
    assert row["finish_reason"] == "length" and row["reasoning_tokens"] > 0


@pytest.mark.parametrize("api,raw", [("openai", "stop"), ("anthropic", "refusal"),
                                     ("responses", "completed"), ("gemini", "SAFETY")])
def test_a_refusal_is_refused_by_each_protocol_s_own_name(caption: Any, sim: SimThread,
                                                          api: str, raw: str) -> None:
    res = run(caption, sim, api, "--prompt", "[refuse] Describe this image.", rows=ROWS[:1])
    row = res.row("camera")
    assert (res.code, row["error_class"], row["attempts"]) == (1, "refused", 1)
    assert row["finish_reason_raw"] == raw


@pytest.mark.parametrize("api,raw", [("openai", "length"), ("anthropic", "max_tokens"),
                                     ("responses", "max_output_tokens"),
                                     ("gemini", "MAX_TOKENS")])
def test_a_cut_caption_is_a_length_finish_by_each_protocol_s_own_name(
        caption: Any, sim: SimThread, api: str, raw: str) -> None:
    res = run(caption, sim, api, "--max-tokens", "5", "--no-stream", rows=ROWS[:1])
    row = res.row("camera")
    assert (row["status"], row["finish_reason"], row["finish_reason_raw"]) == ("ok", "length",
                                                                               raw)


def test_a_wrong_gemini_key_stops_the_run_with_exit_3(caption: Any, sim: SimThread,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTION_API_KEY", "sk-invalid")
    res = run(caption, sim, "gemini", rows=ROWS[:1])
    assert res.code == 3 and "authentication failed" in res.stderr


def test_resuming_without_the_tool_schema_that_made_out_exits_2(caption: Any, sim: SimThread,
                                                                tmp_path: Path) -> None:
    schema = tmp_path / "caption.schema.json"
    schema.write_text('{"type": "object"}')
    assert run(caption, sim, "openai", "--tool-schema", str(schema), rows=ROWS[:1]).code == 0
    res = run(caption, sim, "openai", rows=ROWS[:2])  # the same OUT, the schema left out
    (line,) = res.stderr_lines()
    assert res.code == 2 and "tool schema" in line and "--allow-mixed" in line
