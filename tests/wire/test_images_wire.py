"""The image stage over real TCP: --fetch-urls downloads from an image server on
127.0.0.1, and dedupe of identical images within a run and against OUT.

The client runs in-process (``caption`` fixture) against the fake gateway, which
records every request body, so the assertions are about what was actually sent: the
inline ``data:`` URI (media type, decoded pixel size), how many API requests were
made, and what the output rows say (width/height, sent_*, image_sha256, dedup_of).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import shutil
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import API_KEY
from fake_gateway import Ctx, ImageHost, decode_data_uri, default_caption
from PIL import Image


@pytest.fixture
def images() -> Any:
    with ImageHost() as host:
        yield host


# --------------------------------------------------------------------------- helpers


def jpeg(size: tuple[int, int], colour: tuple[int, int, int] = (200, 40, 40),
         quality: int = 85) -> bytes:
    w, h = size
    im = Image.new("RGB", size, colour)
    im.paste((30, 60, 200), (w // 2, 0, w, h))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def noisy_jpeg(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise(size, 80).convert("RGB").save(buf, "JPEG", quality=95)
    return buf.getvalue()


def png_file(path: Path, colour: tuple[int, int, int]) -> bytes:
    Image.new("RGB", (64, 48), colour).save(path, "PNG")
    return path.read_bytes()


def numbered_captions(gateway: Any, pace: float = 0.0, fail_first: bool = False) -> None:
    """Inline images (scenario ``local``) get 'Caption number N.' in arrival order;
    ``fail_first``: the very first request gets a permanent 400 instead."""
    n = itertools.count(1)

    async def handler(ctx: Ctx) -> web.StreamResponse:
        i = next(n)
        if fail_first and i == 1:
            return await ctx.json_response(400, {"error": {
                "message": "Invalid request: something about this request",
                "type": "invalid_request_error", "code": None}})
        return await ctx.ok(f"Caption number {i}.", pace=pace)

    gateway.on("local", handler)


def sent_images(gateway: Any) -> list[tuple[str, bytes]]:
    return [decode_data_uri(c.url) for c in gateway.calls() if c.url and c.url.startswith("data:")]


FETCH = ["--fetch-urls"]


# --------------------------------------------------------------------------- --fetch-urls


def test_fetched_jpeg_is_sent_inline_downscaled_with_its_columns(caption, gateway, images):
    served = jpeg((3000, 2000))
    url = images.add("/photos/big.jpg", served)
    res = caption([{"id": "r1", "image": url}], *FETCH)
    assert res.code == 0, res.stderr

    [call] = gateway.calls()
    assert call.url.startswith("data:image/jpeg;base64,")
    mime, data = decode_data_uri(call.url)
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "JPEG" and im.size == (1568, 1045)
    assert len(call.url.partition(",")[2]) <= 5 * 1024 * 1024

    row = res.row("r1")
    assert row["status"] == "ok" and row["image"] == url
    assert (row["width"], row["height"]) == (3000, 2000)
    assert (row["sent_width"], row["sent_height"]) == (1568, 1045)
    assert row["sent_bytes"] == len(data)
    assert row["image_sha256"] == hashlib.sha256(served).hexdigest()
    assert row["dedup_of"] is None

    [hit] = images.hits
    assert "Authorization" not in hit.headers
    assert not any(API_KEY in v for v in hit.headers.values()), "API key sent to image host"


def test_fetched_image_that_fits_is_sent_byte_for_byte(caption, gateway, images):
    served = jpeg((640, 480))
    url = images.add("/small.jpg", served, ctype="application/octet-stream")
    res = caption([{"id": "r1", "image": url}], *FETCH)
    assert res.code == 0, res.stderr
    assert sent_images(gateway) == [("image/jpeg", served)]
    assert res.row("r1")["sent_width"] == 640


def test_fetched_max_edge_and_max_image_bytes_apply(caption, gateway, images):
    url = images.add("/big.jpg", jpeg((3000, 2000), quality=95))
    res = caption([{"id": "r1", "image": url}], *FETCH, "--max-edge", "800",
                  "--max-image-bytes", "20000")
    assert res.code == 0, res.stderr
    [(mime, data)] = sent_images(gateway)
    assert mime == "image/jpeg" and len(gateway.calls()[0].url.partition(",")[2]) <= 20000
    with Image.open(io.BytesIO(data)) as im:
        assert max(im.size) <= 800
        assert (res.row("r1")["sent_width"], res.row("r1")["sent_height"]) == im.size


def test_without_fetch_urls_the_url_is_passed_through_unchanged(caption, gateway, images):
    url = images.add("/ok/photo.jpg", jpeg((3000, 2000))) + "?sig=a%20b&x=1"
    res = caption([{"id": "r1", "image": url}])
    assert res.code == 0, res.stderr
    assert [c.url for c in gateway.calls()] == [url]
    assert images.count() == 0, "without --fetch-urls the client must not download"
    row = res.row("r1")
    assert row["caption"] == default_caption(url)
    assert row["width"] is None and row["sent_width"] is None and row["image_sha256"] is None


def test_download_404_is_bad_image_without_an_api_request(caption, gateway, images):
    url = images.url("/missing.jpg")
    res = caption([{"id": "r1", "image": url}], *FETCH)
    assert res.code == 1
    row = res.row("r1")
    assert row["status"] == "error" and row["error_class"] == "bad_image"
    assert "404" in row["error"] and url in row["error"]
    assert gateway.count() == 0
    assert images.count() == 1, "a 404 is permanent: not retried"


def test_html_content_type_is_bad_image(caption, gateway, images):
    url = images.add("/login", b"<html><body>Please sign in</body></html>",
                     ctype="text/html; charset=utf-8")
    res = caption([{"id": "r1", "image": url}], *FETCH)
    row = res.row("r1")
    assert res.code == 1 and row["error_class"] == "bad_image"
    assert "text/html" in row["error"] and url in row["error"]
    assert gateway.count() == 0


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_max_download_bytes_is_bad_image(caption, gateway, images, chunked):
    served = noisy_jpeg((600, 400))
    assert len(served) > 100_000
    url = images.add("/huge.jpg", served, chunked=chunked)
    res = caption([{"id": "r1", "image": url}], *FETCH, "--max-download-bytes", "100000")
    row = res.row("r1")
    assert res.code == 1 and row["error_class"] == "bad_image"
    assert "100000" in row["error"] and url in row["error"]
    assert gateway.count() == 0
    assert images.count() == 1, "too large is permanent: not retried"


def test_download_503_then_200_is_retried_and_succeeds(caption, gateway, images):
    served = jpeg((320, 200))
    url = images.add("/flaky.jpg", served, statuses=[503])
    res = caption([{"id": "r1", "image": url}], *FETCH)
    assert res.code == 0, res.stderr
    assert [h.status for h in images.hits] == [503, 200]
    assert sent_images(gateway) == [("image/jpeg", served)]
    assert res.row("r1")["status"] == "ok"


def test_download_that_keeps_failing_gives_up_after_the_retries(caption, gateway, images):
    url = images.add("/down.jpg", jpeg((32, 32)), statuses=[503] * 10)
    res = caption([{"id": "r1", "image": url}], *FETCH, retries=2)
    row = res.row("r1")
    assert res.code == 1 and row["error_class"] == "bad_image"
    assert "after 3 attempts" in row["error"]
    assert images.count() == 3 and gateway.count() == 0


@pytest.mark.timeout(20)  # the host answers after 30 s: a client that waits fails here
def test_download_timeout_is_retried_then_bad_image(caption, gateway, images):
    url = images.add("/stuck.jpg", jpeg((32, 32)), delay=30.0)
    res = caption([{"id": "r1", "image": url}], *FETCH, "--download-timeout", "0.3",
                  retries=1)
    row = res.row("r1")
    assert res.code == 1 and row["error_class"] == "bad_image"
    assert "after 2 attempts" in row["error"]
    # the client gave up on both (the host would have answered after 30 s)
    assert [h.outcome for h in images.hits] == ["client_gone"] * 2
    assert gateway.count() == 0


def test_parallel_downloads_per_host_are_capped_at_4(caption, gateway, images):
    rows = [{"id": f"r{i:02d}", "image": images.add(f"/slow/{i:02d}.jpg",
                                                    jpeg((64, 48), (i * 20, 90, 90)),
                                                    delay=0.25)}
            for i in range(12)]
    res = caption(rows, *FETCH, concurrency=16)
    assert res.code == 0, res.stderr
    assert images.count() == 12 and gateway.count() == 12
    assert images.peak["127.0.0.1"] <= 4, f"{images.peak} concurrent downloads from one host"
    assert images.peak["127.0.0.1"] == 4, "downloads should still run 4 at a time"


def test_the_download_cap_is_per_host_not_global(caption, gateway, images):
    rows = []
    for i in range(16):
        host = "127.0.0.1" if i % 2 else "localhost"
        images.add(f"/h/{i:02d}.jpg", jpeg((64, 48), (i * 15, 90, 90)), delay=0.25)
        rows.append({"id": f"r{i:02d}", "image": images.url(f"/h/{i:02d}.jpg", host)})
    res = caption(rows, *FETCH, concurrency=16)
    assert res.code == 0, res.stderr
    assert images.peak == {"127.0.0.1": 4, "localhost": 4}
    assert images.peak_total > 4


def test_urls_serving_the_same_bytes_are_captioned_once(caption, gateway, images):
    numbered_captions(gateway, pace=0.02)
    served = jpeg((500, 300))
    rows = [{"id": "u1", "image": images.add("/a.jpg", served)},
            {"id": "u2", "image": images.add("/copy-of-a.jpg", served)}]
    res = caption(rows, *FETCH)
    assert res.code == 0, res.stderr
    assert gateway.count() == 1 and images.count() == 2
    assert {res.row(i)["caption"] for i in ("u1", "u2")} == {"Caption number 1."}
    assert sorted(str(res.row(i)["dedup_of"]) for i in ("u1", "u2")) in (
        ["None", "u1"], ["None", "u2"])


# --------------------------------------------------------------------------- dedupe


@pytest.fixture
def same_images(tmp_path: Path) -> tuple[bytes, bytes]:
    """x.png, y.png (a copy of x under another name) and z.png (different)."""
    x = png_file(tmp_path / "x.png", (200, 30, 30))
    shutil.copy(tmp_path / "x.png", tmp_path / "y.png")
    z = png_file(tmp_path / "z.png", (30, 30, 200))
    return x, z


def test_identical_images_in_a_run_are_captioned_once(caption, gateway, same_images):
    numbered_captions(gateway, pace=0.05)  # slow: the duplicates wait for the one in flight
    rows = [{"id": "a", "image": "x.png"}, {"id": "b", "image": "x.png"},
            {"id": "c", "image": "y.png"}, {"id": "d", "image": "z.png"}]
    res = caption(rows, concurrency=4)
    assert res.code == 0, res.stderr
    assert gateway.count() == 2, "one request for x/y, one for z"

    trio = [res.row(i) for i in "abc"]
    assert all(r["status"] == "ok" for r in trio)
    assert len({r["caption"] for r in trio}) == 1
    originals = [r for r in trio if r["dedup_of"] is None]
    assert len(originals) == 1
    first = originals[0]["id"]
    assert sorted(r["dedup_of"] for r in trio if r["dedup_of"]) == [first, first]
    assert len({r["dedup_key"] for r in trio}) == 1 and trio[0]["dedup_key"]
    assert len({r["image_sha256"] for r in trio}) == 1
    for r in trio:
        if r["dedup_of"]:
            assert r["usage_source"] == "dedup" and r["prompt_tokens"] is None
            assert r["sent_width"] == 64 and r["image_sha256"] == originals[0]["image_sha256"]
    d = res.row("d")
    assert d["dedup_of"] is None and d["caption"] != trio[0]["caption"]
    assert d["dedup_key"] != trio[0]["dedup_key"]


def test_duplicates_point_at_the_first_id_when_rows_run_in_order(caption, gateway,
                                                                 same_images):
    numbered_captions(gateway)
    rows = [{"id": "a", "image": "x.png"}, {"id": "b", "image": "x.png"},
            {"id": "c", "image": "y.png"}]
    res = caption(rows, concurrency=1)
    assert res.code == 0, res.stderr
    assert gateway.count() == 1
    assert [res.row(i)["dedup_of"] for i in "abc"] == [None, "a", "a"]
    assert {res.row(i)["caption"] for i in "abc"} == {"Caption number 1."}


def test_a_failed_original_lets_its_duplicates_try_for_themselves(caption, gateway,
                                                                  same_images):
    numbered_captions(gateway, pace=0.05, fail_first=True)
    rows = [{"id": "a", "image": "x.png"}, {"id": "b", "image": "x.png"},
            {"id": "c", "image": "y.png"}]
    res = caption(rows, concurrency=4)
    assert gateway.count() == 2
    by_status = sorted(res.row(i)["status"] for i in "abc")
    assert by_status == ["error", "ok", "ok"]
    oks = [res.row(i) for i in "abc" if res.row(i)["status"] == "ok"]
    captioned = [r for r in oks if r["dedup_of"] is None]
    assert len(captioned) == 1
    assert [r["dedup_of"] for r in oks if r["dedup_of"]] == [captioned[0]["id"]]


def test_rerun_copies_an_image_already_captioned_in_out(caption, gateway, same_images):
    numbered_captions(gateway)
    first = caption([{"id": "a", "image": "x.png"}, {"id": "d", "image": "z.png"}])
    assert first.code == 0 and gateway.count() == 2
    caption_a = first.row("a")["caption"]

    again = caption([{"id": "a", "image": "x.png"}, {"id": "d", "image": "z.png"},
                     {"id": "new", "image": "y.png"}])
    assert again.code == 0, again.stderr
    assert gateway.count() == 2, "the new row's bytes were captioned already: no request"
    new = again.row("new")
    assert new["status"] == "ok" and new["dedup_of"] == "a"
    assert new["caption"] == caption_a and new["usage_source"] == "dedup"
    assert new["dedup_key"] == again.row("a")["dedup_key"]
    assert again.row("a")["caption"] == caption_a  # untouched by the rerun


def test_no_dedupe_captions_every_row(caption, gateway, same_images):
    numbered_captions(gateway)
    rows = [{"id": "a", "image": "x.png"}, {"id": "b", "image": "x.png"},
            {"id": "c", "image": "y.png"}]
    res = caption(rows, "--no-dedupe")
    assert res.code == 0, res.stderr
    assert gateway.count() == 3
    assert all(res.row(i)["dedup_of"] is None for i in "abc")
    assert len({res.row(i)["caption"] for i in "abc"}) == 3


def test_a_different_prompt_is_captioned_again(caption, gateway, same_images):
    numbered_captions(gateway)
    first = caption([{"id": "a", "image": "x.png"}])
    assert first.code == 0 and gateway.count() == 1

    again = caption([{"id": "a", "image": "x.png"}, {"id": "b", "image": "y.png"}],
                    "--prompt", "List every object in the image.", "--allow-mixed")
    assert again.code == 0, again.stderr
    assert gateway.count() == 2, "same bytes but another prompt: a new request"
    b = again.row("b")
    assert b["dedup_of"] is None and b["caption"] == "Caption number 2."
    assert gateway.calls()[-1].prompt_text == "List every object in the image."
    assert b["dedup_key"] != again.row("a")["dedup_key"]


def test_a_different_per_row_prompt_is_not_a_duplicate(caption, gateway, same_images):
    numbered_captions(gateway)
    rows = [{"id": "a", "image": "x.png", "prompt": "Describe it."},
            {"id": "b", "image": "y.png", "prompt": "Count the objects."},
            {"id": "c", "image": "x.png", "prompt": "Describe it."}]
    res = caption(rows, concurrency=1)
    assert res.code == 0, res.stderr
    assert gateway.count() == 2
    assert [res.row(i)["dedup_of"] for i in "abc"] == [None, None, "a"]


def test_a_different_model_is_captioned_again(caption, gateway, same_images):
    numbered_captions(gateway)
    assert caption([{"id": "a", "image": "x.png"}]).code == 0
    again = caption([{"id": "a", "image": "x.png"}, {"id": "b", "image": "y.png"}],
                    "--model", "another-vision-model", "--allow-mixed")
    assert again.code == 0, again.stderr
    assert gateway.count() == 2 and again.row("b")["dedup_of"] is None
