"""``export --format sidecar``: NAME.txt per image, read back as plain files.

Every OUT here was captioned from the demo images against the simulator (conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import Captioned, copy_images, snapshot

IMAGES = {"astronaut": "astronaut.png", "camera": "camera.png", "chelsea": "chelsea.png",
          "coffee": "coffee.png", "horse": "horse.png", "hubble": "hubble_deep_field.jpg",
          "rocket": "rocket.jpg", "text": "text.png"}


def txt(folder: Path, rid: str) -> Path:
    return folder / Path(IMAGES[rid]).with_suffix(".txt")


def test_mirrored_sidecars_hold_each_images_caption(demo: Captioned, export,
                                                    tmp_path: Path) -> None:
    r = export(demo.out, "--to", tmp_path / "dest", "--format", "sidecar")
    assert r.code == 0, r.stderr
    for rid, row in demo.ok().items():
        if rid in IMAGES:
            assert txt(tmp_path / "dest", rid).read_text(encoding="utf-8") == \
                row["caption"] + "\n"
    assert sorted(p.suffix for p in (tmp_path / "dest").iterdir()) == [".txt"] * 8


def test_beside_images_adds_only_txt_files_and_never_touches_an_image(
        demo: Captioned, export, tmp_path: Path) -> None:
    imgs = copy_images(demo, tmp_path)
    before = snapshot(imgs)
    r = export(demo.out, "--format", "sidecar", "--beside-images", "--base-dir", imgs)
    assert r.code == 0, r.stderr
    after = snapshot(imgs)
    assert {k: v for k, v in after.items() if k in before} == before
    assert sorted(set(after) - set(before)) == sorted(txt(Path(), i).name for i in IMAGES)
    assert "8 written" in r.stdout


def test_trigger_word_comes_first(demo: Captioned, export, tmp_path: Path) -> None:
    export(demo.out, "--to", tmp_path / "d", "--format", "sidecar", "--trigger", "ohwx")
    cap = demo.ok()["horse"]["caption"]
    assert txt(tmp_path / "d", "horse").read_text(encoding="utf-8") == f"ohwx, {cap}\n"


def test_all_captions_writes_every_choice_one_line_each(demo: Captioned, export,
                                                        tmp_path: Path) -> None:
    export(demo.out, "--to", tmp_path / "d", "--format", "sidecar", "--all-captions")
    choices = demo.ok()["rocket"]["captions"]
    assert len(set(choices)) == 2
    assert txt(tmp_path / "d", "rocket").read_text(encoding="utf-8").splitlines() == choices


@pytest.mark.parametrize("order", [("short", "tags"), ("tags", "short")])
def test_named_prompts_are_one_line_each_in_the_given_order(
        named: Captioned, export, tmp_path: Path, order: tuple[str, str]) -> None:
    args = [a for name in order for a in ("--prompt-name", name)]
    r = export(named.out, "--to", tmp_path / "d", "--format", "sidecar", *args)
    assert r.code == 0, r.stderr
    by_prompt = {name: named.ok(name) for name in order}
    two_lines = 0
    for rid in IMAGES:
        want = list(dict.fromkeys(by_prompt[name][rid]["caption"] for name in order))
        assert txt(tmp_path / "d", rid).read_text(encoding="utf-8").splitlines() == want
        two_lines += len(want) == 2
    assert two_lines >= 4  # the prompts' captions differ for most images


def test_one_prompt_name_of_several(named: Captioned, export, tmp_path: Path) -> None:
    export(named.out, "--to", tmp_path / "d", "--format", "sidecar", "--prompt-name", "tags")
    want = named.ok("tags")["coffee"]["caption"] + "\n"
    assert txt(tmp_path / "d", "coffee").read_text(encoding="utf-8") == want


def test_without_prompt_names_the_recorded_order_is_used(named: Captioned, export,
                                                         tmp_path: Path) -> None:
    export(named.out, "--to", tmp_path / "d", "--format", "sidecar")
    short, tags = named.ok("short")["camera"]["caption"], named.ok("tags")["camera"]["caption"]
    assert txt(tmp_path / "d", "camera").read_text(encoding="utf-8").splitlines() == \
        list(dict.fromkeys([short, tags]))  # _dataset.json lists short first


def _beside(c: Captioned, export, imgs: Path, *args: object):  # type: ignore[no-untyped-def]
    return export(c.out, "--format", "sidecar", "--beside-images", "--base-dir", imgs, *args)


def test_policy_skip_leaves_an_existing_sidecar_as_it_is(demo: Captioned, export,
                                                         tmp_path: Path) -> None:
    imgs = copy_images(demo, tmp_path)
    txt(imgs, "coffee").write_text("my own caption\n", encoding="utf-8")
    r = _beside(demo, export, imgs)
    assert txt(imgs, "coffee").read_text(encoding="utf-8") == "my own caption\n"
    assert "7 written" in r.stdout and "1 kept (policy skip)" in r.stdout


def test_policy_overwrite_replaces_an_existing_sidecar(demo: Captioned, export,
                                                       tmp_path: Path) -> None:
    imgs = copy_images(demo, tmp_path)
    txt(imgs, "coffee").write_text("my own caption\n", encoding="utf-8")
    _beside(demo, export, imgs, "--policy", "overwrite")
    assert txt(imgs, "coffee").read_text(encoding="utf-8") == \
        demo.ok()["coffee"]["caption"] + "\n"


def test_policy_append_adds_after_the_existing_text_without_duplicating(
        demo: Captioned, export, tmp_path: Path) -> None:
    imgs = copy_images(demo, tmp_path)
    txt(imgs, "coffee").write_text("hand tag, mug", encoding="utf-8")  # no final newline
    _beside(demo, export, imgs, "--policy", "append")
    want = "hand tag, mug\n" + demo.ok()["coffee"]["caption"] + "\n"
    assert txt(imgs, "coffee").read_text(encoding="utf-8") == want
    r = _beside(demo, export, imgs, "--policy", "append")
    assert txt(imgs, "coffee").read_text(encoding="utf-8") == want
    assert "8 unchanged" in r.stdout


def test_policy_prepend_adds_before_the_existing_text_without_duplicating(
        demo: Captioned, export, tmp_path: Path) -> None:
    imgs = copy_images(demo, tmp_path)
    txt(imgs, "coffee").write_text("hand tag, mug\n", encoding="utf-8")
    _beside(demo, export, imgs, "--policy", "prepend")
    _beside(demo, export, imgs, "--policy", "prepend")
    assert txt(imgs, "coffee").read_text(encoding="utf-8") == \
        demo.ok()["coffee"]["caption"] + "\nhand tag, mug\n"


@pytest.mark.parametrize("policy", ["skip", "overwrite", "append", "prepend"])
def test_a_second_export_with_the_same_arguments_changes_nothing(
        named: Captioned, export, tmp_path: Path, policy: str) -> None:
    imgs = copy_images(named, tmp_path)
    txt(imgs, "horse").write_text("an existing line\n", encoding="utf-8")
    args = ("--policy", policy, "--trigger", "ohwx")
    assert _beside(named, export, imgs, *args).code == 0
    first = snapshot(imgs)
    r = _beside(named, export, imgs, *args)
    assert r.code == 0
    assert snapshot(imgs) == first  # contents and modification times
    assert "0 written" in r.stdout and "updated" not in r.stdout


def test_append_of_another_prompt_adds_only_its_line(named: Captioned, export,
                                                     tmp_path: Path) -> None:
    imgs = copy_images(named, tmp_path)
    _beside(named, export, imgs, "--prompt-name", "short")
    _beside(named, export, imgs, "--prompt-name", "short", "--prompt-name", "tags",
            "--policy", "append")
    short, tags = named.ok("short")["chelsea"]["caption"], named.ok("tags")["chelsea"]["caption"]
    assert txt(imgs, "chelsea").read_text(encoding="utf-8").splitlines() == \
        list(dict.fromkeys([short, tags]))


def test_url_missing_and_error_rows_are_skipped_and_counted(demo: Captioned, export,
                                                            tmp_path: Path) -> None:
    imgs = copy_images(demo, tmp_path)
    r = _beside(demo, export, imgs, "--include-errors")
    assert r.code == 0
    assert "1 http(s) images (no local file)" in r.stdout
    assert "1 rows without a caption" in r.stdout  # ghost: an error row, no file either
    assert not (imgs / "ghost.txt").exists()


def test_images_can_be_copied_beside_mirrored_sidecars_once(demo: Captioned, export,
                                                            tmp_path: Path) -> None:
    dest = tmp_path / "kohya" / "10_ohwx"
    r = export(demo.out, "--to", dest, "--format", "sidecar", "--images", "copy")
    assert r.code == 0 and "8 images placed" in r.stdout
    for name in IMAGES.values():
        assert (dest / name).read_bytes() == (demo.images / name).read_bytes()
    first = snapshot(dest)
    r = export(demo.out, "--to", dest, "--format", "sidecar", "--images", "copy", "--force")
    assert "images placed" not in r.stdout and snapshot(dest) == first


def test_a_sidecar_that_is_not_text_is_left_alone(demo: Captioned, export,
                                                  tmp_path: Path) -> None:
    imgs = copy_images(demo, tmp_path)
    txt(imgs, "text").write_bytes(b"\xff\xfe\x00binary")
    r = _beside(demo, export, imgs, "--policy", "append")
    assert txt(imgs, "text").read_bytes() == b"\xff\xfe\x00binary"
    assert "1 existing sidecars that are not caption text" in r.stdout


def test_images_sharing_one_sidecar_name_are_skipped_not_merged(
        sim, tmp_path: Path, export) -> None:  # type: ignore[no-untyped-def]
    from .helpers import API_KEY, SAMPLES, caption

    folder = tmp_path / "clash"
    folder.mkdir()
    (folder / "a.png").write_bytes((SAMPLES / "horse.png").read_bytes())
    (folder / "a.jpg").write_bytes((SAMPLES / "rocket.jpg").read_bytes())
    (folder / "b.png").write_bytes((SAMPLES / "camera.png").read_bytes())
    (folder / "m.csv").write_text("id,image\npa,a.png\nja,a.jpg\nb,b.png\n", encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAPTION_API_KEY", API_KEY)
        caption(sim, folder / "m.csv", tmp_path / "out")
    r = export(tmp_path / "out", "--format", "sidecar", "--beside-images")
    assert r.code == 0
    assert not (folder / "a.txt").exists() and (folder / "b.txt").is_file()
    assert "2 rows whose images share one sidecar name" in r.stdout
    assert "a.jpg and" in r.stderr and "a.png" in r.stderr
