"""The same jobs against a real S3-compatible server on loopback (moto's standalone
server, a subprocess speaking S3 over HTTP on 127.0.0.1): manifests, images, folders,
Parquet and shards read from ``s3://`` through fsspec/s3fs, and a SIGKILLed run that
resumes to exactly one row per key. Credentials and the endpoint come from the AWS
environment variables, as they would for a user."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.simulator.app import SimConfig
from pipeline.simulator.thread import SimThread

from .helpers import (
    API_KEY,
    REPO,
    caption,
    rows,
    sample_images,
    write_parquet,
    write_shard,
)

IMAGES = sample_images(4)
BUCKET = "captions-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    """moto's S3 server on 127.0.0.1, the AWS variables pointing at it, a bucket."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
           "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "no moto server"
                time.sleep(0.05)
        fs = _fs()
        fs.mkdir(BUCKET)
        yield env
    finally:
        proc.kill()
        proc.wait(10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _fs() -> Any:
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


def _put(key: str, data: bytes) -> str:
    _fs().pipe(f"{BUCKET}/{key}", data)
    return f"s3://{BUCKET}/{key}"


@pytest.fixture(scope="module")
def sim() -> Iterator[SimThread]:
    s = SimThread(SimConfig(latency=0.0, tokens_per_second=0.0))
    yield s
    s.stop()


def _ok(out: Path) -> dict[str, dict[str, Any]]:
    got = rows(out)
    assert all(r["status"] == "ok" for r in got), [r["error"] for r in got]
    return {r["id"]: r for r in got}


def test_a_csv_manifest_on_s3_reads_its_relative_images_from_s3(
        s3: dict[str, str], sim: SimThread, tmp_path: Path) -> None:
    for im in IMAGES:
        _put(f"job/imgs/{im.name}", im.data)
    text = "id,image,tag\n" + "".join(f"{im.stem},imgs/{im.name},{im.tag}\n" for im in IMAGES)
    manifest = _put("job/m.csv", text.encode())
    assert caption(sim, manifest, tmp_path / "out") == 0
    got = _ok(tmp_path / "out")
    assert sorted(got) == sorted(im.stem for im in IMAGES)
    record = json.loads((tmp_path / "out" / "_dataset.json").read_text())
    assert record["manifest"]["path"] == manifest
    assert record["manifest"]["base_dir"] == f"s3://{BUCKET}/job"
    assert "testing-secret" not in (tmp_path / "out" / "_dataset.json").read_text()


def test_a_missing_s3_image_is_a_bad_image_row_naming_its_url(
        s3: dict[str, str], sim: SimThread, tmp_path: Path) -> None:
    ref = f"s3://{BUCKET}/nowhere/ghost.png"
    manifest = _put("ghost/m.jsonl", json.dumps({"id": "g", "image": ref}).encode())
    assert caption(sim, manifest, tmp_path / "out") == 1
    (row,) = rows(tmp_path / "out")
    assert row["error_class"] == "bad_image"
    assert row["error"] == f"image file not found: {ref}"


def test_a_folder_parquet_and_shards_on_s3_caption_like_local_ones(
        s3: dict[str, str], sim: SimThread, tmp_path: Path) -> None:
    for im in IMAGES:
        _put(f"photos/{im.name}", im.data)
        _put(f"photos/{im.stem}.txt", f"old {im.stem}".encode())
    local = tmp_path / "local"
    local.mkdir()
    _put("hf/train.parquet", write_parquet(local / "hf.parquet", IMAGES, True).read_bytes())
    _put("shards/00000.tar", write_shard(local / "a.tar", IMAGES[:2]).read_bytes())
    _put("shards/00001.tar", write_shard(local / "b.tar", IMAGES[2:]).read_bytes())

    assert caption(sim, f"s3://{BUCKET}/photos", tmp_path / "folder") == 0
    folder = _ok(tmp_path / "folder")
    assert sorted(folder) == sorted(im.name for im in IMAGES)
    assert folder[IMAGES[0].name]["existing_caption"] == f"old {IMAGES[0].stem}"

    assert caption(sim, f"s3://{BUCKET}/hf/train.parquet", tmp_path / "hf") == 0
    hf = _ok(tmp_path / "hf")
    assert sorted(hf) == sorted(im.name for im in IMAGES)

    assert caption(sim, f"s3://{BUCKET}/shards/{{00000..00001}}.tar", tmp_path / "wds") == 0
    wds = _ok(tmp_path / "wds")
    assert sorted(wds) == sorted(im.stem for im in IMAGES)
    assert wds[IMAGES[2].stem]["source_file"] == f"s3://{BUCKET}/shards/00001.tar"

    by_sha = [{r["image_sha256"]: r["caption"] for r in d.values()} for d in (folder, hf, wds)]
    assert by_sha[0] == by_sha[1] == by_sha[2]


N_SAMPLES = 40


@pytest.mark.slow
def test_a_run_on_s3_shards_killed_with_sigkill_resumes_to_one_row_per_key(
        s3: dict[str, str], tmp_path: Path) -> None:
    images = sample_images(8)
    local = tmp_path / "shards"
    local.mkdir()
    keys = []
    for shard in range(2):
        with __import__("tarfile").open(local / f"{shard:05d}.tar", "w") as tf:
            from .helpers import tar_member

            for i in range(N_SAMPLES // 2):
                im = images[(shard * 7 + i) % len(images)]
                key = f"s{shard}-{i:03d}"
                keys.append(key)
                tar_member(tf, f"{key}.{im.name.rsplit('.', 1)[1]}", im.data)
        _put(f"kill/{shard:05d}.tar", (local / f"{shard:05d}.tar").read_bytes())
    pattern = f"s3://{BUCKET}/kill/{{00000..00001}}.tar"
    out = tmp_path / "out"
    slow = SimThread(SimConfig(latency=0.15, tokens_per_second=0.0))
    env = {**os.environ, **s3, "CAPTION_API_KEY": API_KEY, "NO_PROXY": "127.0.0.1",
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pipeline", "caption", pattern, "--out", str(out),
           "--base-url", slow.base_url, "--no-progress", "--concurrency", "4",
           "--flush-rows", "4", "--no-dedupe"]
    try:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not list(out.glob("part-*.parquet")):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "no part was committed in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        first = {r["id"] for r in rows(out)} if list(out.glob("part-*.parquet")) else set()
        assert 0 < len(first) < N_SAMPLES, "the run finished before it was killed"
        again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=120)
        assert again.returncode == 0, again.stderr
    finally:
        slow.stop()
    final = rows(out)
    assert sorted(r["id"] for r in final) == sorted(keys)  # each key exactly once
    assert all(r["status"] == "ok" for r in final)
    assert "testing-secret" not in again.stderr + again.stdout
