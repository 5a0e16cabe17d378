"""The batch lane's parts at their seams: the ledger, request files and their split,
result lines → outcomes, collection in any order, and batch prices."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.batch.collect import collect
from pipeline.batch.files import Caps, RequestFile, index_of, row_record, split_file
from pipeline.batch.ledger import Entry, Ledger, in_flight_keys
from pipeline.batch.results import parse_result
from pipeline.errors import TRANSIENT, RunFatal
from pipeline.keys import KeySet, key_hash
from pipeline.pacing.cost import Price, batch_price_for
from pipeline.records import ManifestRow, ResultRow
from pipeline.settings import Secret, Settings
from pipeline.wire.adapters import get_adapter

OPENAI, ANTHROPIC = get_adapter("openai"), get_adapter("anthropic")
CHAT = {"id": "chatcmpl-1", "object": "chat.completion", "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "A red square."},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}}
MESSAGE = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
           "content": [{"type": "text", "text": "A red square."}], "stop_reason": "end_turn",
           "usage": {"input_tokens": 10, "output_tokens": 4}}


def _line(doc: Any) -> bytes:
    return json.dumps(doc).encode()


# ---------------------------------------------------------------- the ledger


def test_a_saved_entry_is_read_back_and_no_temporary_file_is_left(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "_batches")
    ledger.save(Entry("cpa", "openai", "m", "run", sha256="ab", requests=3))
    [entry] = ledger.entries()
    assert (entry.lid, entry.state, entry.requests) == ("cpa", "built", 3)
    assert [p.name for p in ledger.dir.iterdir()] == ["cpa.json"]


def test_a_damaged_entry_is_skipped_not_fatal(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.save(Entry("cpa", "openai", "m", "run"))
    (tmp_path / "cpb.json").write_text("{not json")
    (tmp_path / "cpc.json").write_text("[1, 2]")
    assert [e.lid for e in ledger.entries()] == ["cpa"]


def test_a_parent_whose_split_was_not_recorded_is_marked_split(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.save(Entry("cpa", "openai", "m", "run", state="built"))
    ledger.save(Entry("cpb", "openai", "m", "run", state="built", parent="cpa"))
    assert [e.lid for e in ledger.open_entries()] == ["cpb"]
    assert next(e for e in ledger.entries() if e.lid == "cpa").state == "split"


def test_the_keys_of_batches_in_flight_are_known_and_collected_ones_are_not(
        tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    for lid, state in (("cpa", "created"), ("cpb", "collected")):
        f = RequestFile(lid, ledger.requests_path(lid), ledger.rows_path(lid), Caps(10, 10**6))
        f.add(b"{}\n", row_record(_row(lid), {}, key_hash(lid, "default")), 0, 0.0)
        f.seal()
        ledger.save(Entry(lid, "openai", "m", "run", state=state))
    keys = in_flight_keys(ledger)
    assert key_hash("cpa", "default") in keys and key_hash("cpb", "default") not in keys


# ---------------------------------------------------------------- request files


def test_caps_count_requests_bytes_and_tokens() -> None:
    caps = Caps(requests=2, bytes=2000, tokens=100)
    assert caps.fits(2, 900, 100)
    assert not caps.fits(3, 10, 10)
    assert not caps.fits(1, 1000, 10)   # with the envelope the provider adds
    assert not caps.fits(1, 10, 101)


@pytest.mark.parametrize("cid", ["cpa-x", "cpb-1", "cpa-", "cpa--1", 7, None,
                                 "cpa-" + "9" * 12])
def test_a_custom_id_that_is_not_this_entrys_names_no_row(cid: Any) -> None:
    assert index_of("cpa", cid) is None


def _row(rid: str) -> ManifestRow:
    return ManifestRow(rid, f"{rid}.png", "p", 2, {"extra": "x"})


def _file(tmp: Path, lid: str, n: int, copies: dict[int, int] | None = None) -> RequestFile:
    ledger = Ledger(tmp)
    f = RequestFile(lid, ledger.requests_path(lid), ledger.rows_path(lid), Caps(100, 10**6))
    for i in range(n):
        if copies and i in copies:
            f.add_copy({**row_record(_row(f"r{i}"), {}, i), "copy_of": copies[i]})
            continue
        line = _line({"custom_id": f.next_id(), "body": {"i": i}}) + b"\n"
        f.add(line, row_record(_row(f"r{i}"), {}, i), 0, 0.0)
    f.seal()
    return f


def test_a_split_puts_half_of_the_requests_in_each_file_and_a_copy_beside_its_original(
        tmp_path: Path) -> None:
    _file(tmp_path, "cpa", 5, copies={4: 1})
    ledger = Ledger(tmp_path)
    halves = [RequestFile(lid, ledger.requests_path(lid), ledger.rows_path(lid),
                          Caps(100, 10**6)) for lid in ("cpb", "cpc")]
    split_file(ledger.requests_path("cpa"), ledger.rows_path("cpa"), "cpa", halves)
    for h in halves:
        h.seal()
    assert [h.requests for h in halves] == [2, 2] and [h.rows for h in halves] == [3, 2]
    lines = [json.loads(x) for x in ledger.requests_path("cpb").read_text().splitlines()]
    assert [d["custom_id"] for d in lines] == ["cpb-0", "cpb-1"]
    rows = [json.loads(x) for x in ledger.rows_path("cpb").read_text().splitlines()]
    assert rows[2]["id"] == "r4" and rows[2]["copy_of"] == 1


# ---------------------------------------------------------------- result lines


def test_an_openai_success_is_read_by_the_adapter() -> None:
    o = parse_result("openai", _line({"custom_id": "c", "error": None, "response": {
        "status_code": 200, "request_id": "req_1", "body": CHAT}}), OPENAI)
    assert o is not None and o.completion is not None
    assert (o.completion.text, o.request_id, o.http_status) == ("A red square.", "req_1", 200)


@pytest.mark.parametrize("status,cls", [(500, "server"), (429, "rate_limit"),
                                        (400, "bad_request")])
def test_an_openai_error_answer_gets_the_online_error_class(status: int, cls: str) -> None:
    body = {"error": {"message": "nope", "type": "x"}}
    o = parse_result("openai", _line({"custom_id": "c", "response": {
        "status_code": status, "body": body}}), OPENAI)
    assert o is not None and o.error is not None and o.error.error_class == cls


def test_an_authentication_error_in_one_result_fails_that_row_not_the_run() -> None:
    o = parse_result("openai", _line({"custom_id": "c", "response": {
        "status_code": 401, "body": {"error": {"message": "bad key"}}}}), OPENAI)
    assert o is not None and not isinstance(o.error, RunFatal) and o.error is not None


@pytest.mark.parametrize("code,cls", [("batch_expired", "expired"),
                                      ("batch_cancelled", "canceled")])
def test_an_openai_request_its_batch_never_ran_is_transient(code: str, cls: str) -> None:
    o = parse_result("openai", _line({"custom_id": "c", "response": None,
                                      "error": {"code": code, "message": "m"}}), OPENAI)
    assert o is not None and o.error is not None
    assert o.error.error_class == cls and cls in TRANSIENT


@pytest.mark.parametrize("result,cls", [
    ({"type": "errored", "error": {"type": "error", "error": {
        "type": "overloaded_error", "message": "Overloaded"}}}, "overloaded"),
    ({"type": "errored", "error": {"type": "error", "error": {
        "type": "invalid_request_error", "message": "max_tokens: Field required"}}},
     "bad_request"),
    ({"type": "expired"}, "expired"), ({"type": "canceled"}, "canceled"),
    ({"type": "weird"}, "bad_response"), ("not an object", "bad_response")])
def test_an_anthropic_result_that_did_not_succeed_gets_its_class(result: Any, cls: str) -> None:
    o = parse_result("anthropic", _line({"custom_id": "c", "result": result}), ANTHROPIC)
    assert o is not None and o.error is not None and o.error.error_class == cls


def test_an_anthropic_success_is_read_by_the_adapter() -> None:
    o = parse_result("anthropic", _line({"custom_id": "c", "result": {
        "type": "succeeded", "message": MESSAGE}}), ANTHROPIC)
    assert o is not None and o.completion is not None and o.completion.text == "A red square."


@pytest.mark.parametrize("raw", [b"{not json", b"[]", b'{"custom_id": 5}', b""])
def test_a_line_that_is_no_result_is_none(raw: bytes) -> None:
    assert parse_result("openai", raw, OPENAI) is None


def test_a_success_body_of_the_wrong_shape_is_a_bad_response_row() -> None:
    o = parse_result("openai", _line({"custom_id": "c", "response": {
        "status_code": 200, "body": {"choices": "many"}}}), OPENAI)
    assert o is not None and o.error is not None and o.error.error_class == "bad_response"


# ---------------------------------------------------------------- collection


async def _lines(*docs: Any) -> AsyncIterator[bytes]:
    for d in docs:
        yield d if isinstance(d, bytes) else _line(d)


def _ok(cid: str) -> dict[str, Any]:
    return {"custom_id": cid, "response": {"status_code": 200, "body": CHAT}}


async def _collect(tmp: Path, lines: AsyncIterator[bytes], done: KeySet,
                   copies: dict[int, int] | None = None, hold: bool = False
                   ) -> tuple[list[ResultRow], Any]:
    _file(tmp, "cpa", 4, copies)
    kept: list[ResultRow] = []

    async def room() -> None:
        return None

    entry = Entry("cpa", "openai", "m", "run", batch_id="batch_1")
    got = await collect(entry, lines, Ledger(tmp).rows_path("cpa"), OPENAI,
                        Price(3.0, 15.0), done, kept.append, room, hold_transient=hold)
    return kept, got


async def test_results_in_any_order_repeated_or_foreign_make_one_row_each(
        tmp_path: Path) -> None:
    lines = _lines(_ok("cpa-2"), b"garbage", _ok("cpb-0"), _ok("cpa-0"), _ok("cpa-2"),
                   _ok("cpa-1"), _ok("cpa-3"), _ok("cpa-99"))
    kept, got = await _collect(tmp_path, lines, KeySet())
    assert sorted(r.id for r in kept) == ["r0", "r1", "r2", "r3"]
    assert got.skipped == 1 and got.foreign == 3
    r = kept[0]
    assert (r.lane, r.batch_id, r.caption, r.extra) == ("batch", "batch_1", "A red square.",
                                                        {"extra": "x"})
    assert r.cost_usd == pytest.approx((10 * 3.0 + 4 * 15.0) / 1e6)


async def test_a_result_for_a_key_out_already_holds_is_not_written_again(
        tmp_path: Path) -> None:
    done = KeySet()
    done.add(1)  # row index 1's key (the test rows' key is their index)
    kept, got = await _collect(tmp_path, _lines(*(_ok(f"cpa-{i}") for i in range(4))), done)
    assert sorted(r.id for r in kept) == ["r0", "r2", "r3"] and got.skipped == 1


async def test_a_copy_of_an_identical_image_is_written_after_its_original(
        tmp_path: Path) -> None:
    kept, _ = await _collect(tmp_path, _lines(_ok("cpa-0"), _ok("cpa-1"), _ok("cpa-2")),
                             KeySet(), copies={3: 1})
    copy = next(r for r in kept if r.id == "r3")
    assert (copy.dedup_of, copy.caption, copy.cost_usd, copy.lane) == ("r1", "A red square.",
                                                                       0.0, "batch")


async def test_held_transient_results_are_listed_not_written(tmp_path: Path) -> None:
    expired = {"custom_id": "cpa-3", "response": None, "error": {"code": "batch_expired"}}
    lines = _lines(_ok("cpa-0"), _ok("cpa-1"), _ok("cpa-2"), expired)
    kept, got = await _collect(tmp_path, lines, KeySet(), hold=True)
    assert len(kept) == 3 and got.transient == [3]
    (tmp_path / "b").mkdir()
    kept, got = await _collect(tmp_path / "b", _lines(expired), KeySet())
    assert [r.error_class for r in kept] == ["expired"]


# ---------------------------------------------------------------- prices and settings


def test_batch_prices_are_half_the_online_ones_unless_given() -> None:
    assert batch_price_for(Price(3.0, 15.0), None, None) == Price(1.5, 7.5)
    assert batch_price_for(Price(3.0, 15.0), 1.0, None) == Price(1.0, 7.5)
    assert batch_price_for(None, None, None) is None


def _settings(**kw: Any) -> Settings:
    return Settings(manifest=Path("m.csv"), out=Path("o"), base_url="http://127.0.0.1:1/v1",
                    api_key=Secret(""), **kw)


def test_the_batch_lane_prices_rows_at_the_batch_price() -> None:
    s = _settings(lane="batch", model="claude-3-5-sonnet-20240620")
    assert s.price == Price(1.5, 7.5)
    assert _settings(model="claude-3-5-sonnet-20240620").price == Price(3.0, 15.0)


@pytest.mark.parametrize("kw,says", [
    ({"lane": "later"}, "--lane"), ({"lane": "batch", "engine": "ray"}, "--engine ray"),
    ({"batch_max_bytes": 0}, "--batch-max-bytes"), ({"poll_interval": 0}, "--poll-interval"),
    ({"batch_price_in": -1.0}, "--batch-price-in")])
def test_bad_batch_settings_exit_2_naming_the_option(kw: dict[str, Any], says: str) -> None:
    with pytest.raises(RunFatal) as e:
        _settings(**kw)
    assert e.value.exit_code == 2 and says in e.value.message


def test_the_caps_are_the_providers_unless_given_smaller() -> None:
    assert _settings(lane="batch").batch_caps == (50_000, 200_000_000)
    assert _settings(lane="batch", api="anthropic").batch_caps == (100_000, 256_000_000)
    assert _settings(lane="batch", batch_max_requests=10**6).batch_caps[0] == 50_000


def test_files_of_a_request_file_no_entry_names_are_removed(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    _file(tmp_path, "cpa", 1)
    _file(tmp_path, "cpb", 1)
    ledger.save(Entry("cpa", "openai", "m", "run"))
    assert ledger.remove_orphans() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cpa.json", "cpa.requests.jsonl", "cpa.rows.jsonl"]
