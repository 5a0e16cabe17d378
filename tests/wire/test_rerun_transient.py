"""Error rows of a transient class are captioned by the next plain run; permanent ones stay."""

from __future__ import annotations

from typing import Any

from fake_gateway import img


def test_a_plain_rerun_captions_the_transient_error_rows(caption: Any, gateway: Any) -> None:
    rows = [{"id": "flaky", "image": img("C18", "a.jpg", fail=2)},   # 2 attempts fail
            {"id": "refused", "image": img("C17-refusal", "b.jpg", fail=99)},
            {"id": "fine", "image": img("ok", "c.jpg")}]
    first = caption(rows, retries=1)
    assert first.code == 1
    assert first.row("flaky")["error_class"] == "stream_error"
    refused = first.row("refused")["error_class"]
    sent = gateway.count()

    again = caption(rows, retries=1)
    assert again.code == 0, again.stderr
    assert again.row("flaky")["status"] == "ok"
    assert again.row("refused")["error_class"] == refused  # permanent: not sent again
    assert gateway.count() == sent + 1
    assert "earlier error rows: retried=1 kept=1" in again.stdout
    assert len(again.df) == 3
