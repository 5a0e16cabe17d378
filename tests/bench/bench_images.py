"""`make bench-images`: the image stage against a plain Pillow loop, and event-loop lag.

Generates large synthetic photos (6000x4000 JPEGs), then in the same run measures
images prepared per second by (1) the obvious loop, ``Image.open -> convert ->
thumbnail -> save`` one after another, and (2) the pipeline's ``ImageSource``
(draft decode, thread pool sized to the cores). While (2) runs at full speed, a
ticker on the event loop measures how late it wakes, with live streams from the
simulator (a separate process) flowing on the same loop.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
from PIL import Image

from pipeline.images.load import ImageSource, default_executor
from pipeline.images.prepare import ImagePolicy
from pipeline.records import ManifestRow


def make_photo(path: Path, seed: int, size: tuple[int, int] = (6000, 4000)) -> None:
    """A photo-like JPEG: smooth colour fields plus sensor-like noise (not flat, not random)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray((rng.random((40, 60, 3)) * 255).astype(np.uint8))
    big = np.asarray(small.resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
    noise = rng.integers(-12, 12, size=(size[1], size[0], 1), dtype=np.int16)
    Image.fromarray(np.clip(big + noise, 0, 255).astype(np.uint8)).save(path, quality=90)


def plain_loop(paths: list[Path]) -> float:
    t0 = time.perf_counter()
    for p in paths:
        im = Image.open(p).convert("RGB")
        im.thumbnail((1568, 1568))
        im.save(io.BytesIO(), "JPEG", quality=85)
    return len(paths) / (time.perf_counter() - t0)


async def ticker(stop: asyncio.Event, lags: list[float], period: float = 0.005) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(period)
        lags.append(time.perf_counter() - t - period)


async def streams(base: str, stop: asyncio.Event, counter: list[int]) -> None:
    body = {"model": "m", "stream": True, "max_tokens": 200, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "describe"}, {
            "type": "image_url", "image_url": {"url": "http://img.test/x.jpg"}}]}]}
    async with aiohttp.ClientSession() as s:
        while not stop.is_set():
            async with s.post(base + "/chat/completions", json=body) as r:
                async for _ in r.content.iter_any():
                    counter[0] += 1


async def pipeline_stage(paths: list[Path], base: str | None
                         ) -> tuple[float, float, float, int]:
    """Images/s of the stage; with ``base``, also loop lag next to 8 live streams."""
    executor = default_executor()
    source = ImageSource(paths[0].parent, ImagePolicy(), executor)
    rows = [ManifestRow(p.stem, p.name, None, i, {}) for i, p in enumerate(paths)]
    stop, lags, chunks = asyncio.Event(), [0.0], [0]
    background = [asyncio.create_task(ticker(stop, lags))]
    if base:
        background += [asyncio.create_task(streams(base, stop, chunks)) for _ in range(8)]
    await asyncio.sleep(0.5)  # streams flowing before the stage starts
    lags.clear()
    t0 = time.perf_counter()
    await asyncio.gather(*(source.load(r) for r in rows))
    rate = len(paths) / (time.perf_counter() - t0)
    stop.set()
    await asyncio.gather(*background, return_exceptions=True)
    executor.shutdown()
    return rate, max(lags), float(np.percentile(lags, 99)), chunks[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=12)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    sim = subprocess.Popen([sys.executable, "-m", "pipeline", "simulate", "--port", "0",
                            "--latency", "0", "--tokens-per-second", "400"],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert sim.stdout is not None
        base = sim.stdout.readline().strip().rsplit(" ", 1)[-1]
        with tempfile.TemporaryDirectory() as tmp:
            paths = [Path(tmp) / f"photo{i}.jpg" for i in range(args.images)]
            for i, path in enumerate(paths):
                make_photo(path, i)
            plains, rates = [], []
            for _ in range(args.repeat):  # interleaved, medians: the machine is shared
                plains.append(plain_loop(paths))
                rates.append(asyncio.run(pipeline_stage(paths, None))[0])
            plain, rate = float(np.median(plains)), float(np.median(rates))
            _, worst, p99, chunks = asyncio.run(pipeline_stage(paths, base))
    finally:
        sim.terminate()
        sim.wait(10)
    print(f"\n{args.images} synthetic 6000x4000 JPEGs, {os.cpu_count()} cores, "
          f"median of {args.repeat}\n")
    print("| measurement | figure |")
    print("|---|---|")
    print(f"| plain loop (open, convert, thumbnail, save) | {plain:.2f} img/s |")
    print(f"| pipeline image stage (thread pool, draft decode) | {rate:.2f} img/s |")
    print(f"| ratio | {rate / plain:.1f}x |")
    print(f"| worst event-loop lag during the stage (8 live streams) | {worst * 1000:.1f} ms |")
    print(f"| p99 event-loop lag | {p99 * 1000:.1f} ms |")
    print(f"| stream chunks received meanwhile | {chunks} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
