"""`make bench-ray`: throughput of the local engine and of `--engine ray` with 1 and 2
caption actors on image-heavy input.

N distinct photo-like JPEGs of 3000x2000 (local files, each different so nothing is
deduplicated) are captioned against the simulator (in this process, on its own thread,
latency 0, no token pacing): the work is reading, decoding, resizing and re-encoding
the images. Each run is a fresh `python -m pipeline caption` process (Ray started and
stopped inside it). Reported: wall time of the process (Ray start-up included) and the
steady rate, rows / (last - first `finished_at`).

    python tests/bench/bench_ray.py [--images 200] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def make_images(folder: Path, n: int) -> Path:
    from PIL import Image, ImageDraw

    sources = [Image.open(p).convert("RGB") for p in sorted((REPO / "data" / "sample").iterdir())
               if p.suffix in (".png", ".jpg")]
    lines = ["id,image"]
    for i in range(n):
        path = folder / f"img{i:04d}.jpg"
        if not path.exists():
            img = sources[i % len(sources)].resize((3000, 2000), Image.Resampling.BICUBIC)
            ImageDraw.Draw(img).text((40 + i, 40), f"image {i}", fill=(255, 255, 0))
            img.save(path, "JPEG", quality=92)
        lines.append(f"i{i:04d},{path.name}")
    manifest = folder / "images.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def run(manifest: Path, out: Path, base_url: str, concurrency: int, engine: list[str]
        ) -> tuple[float, float, int]:
    import pandas as pd

    env = {**os.environ, "CAPTION_API_KEY": "sk-bench", "NO_PROXY": "127.0.0.1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipeline", "caption", str(manifest),
                           "--out", str(out), "--base-url", base_url, "--no-progress",
                           "--concurrency", str(concurrency), *engine],
                          env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        sys.exit(f"run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    df = pd.read_parquet(out)
    spread = (df["finished_at"].max() - df["finished_at"].min()).total_seconds()
    return wall, (len(df) - 1) / spread if spread > 0 else float("nan"), len(df)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--cache", type=Path, help="folder to keep the generated JPEGs in")
    args = p.parse_args()
    from pipeline.simulator.app import SimConfig
    from pipeline.simulator.thread import SimThread

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.cache or Path(tmp) / "images"
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        manifest = make_images(folder, args.images)
        print(f"{args.images} JPEGs of 3000x2000 ready in {time.monotonic() - t0:.0f} s; "
              f"{os.cpu_count()} CPUs", flush=True)
        sim = SimThread(SimConfig(latency=0.0, tokens_per_second=0.0))
        modes = [("local engine", []),
                 ("ray, 1 actor", ["--engine", "ray", "--ray-actors", "1"]),
                 ("ray, 2 actors", ["--engine", "ray", "--ray-actors", "2"])]
        rows = []
        try:
            for i, (name, engine) in enumerate(modes):
                wall, rate, n = run(manifest, Path(tmp) / f"out{i}",
                                    f"http://127.0.0.1:{sim.port}/v1",
                                    args.concurrency, engine)
                rows.append((name, n, wall, rate))
                print(f"  {name}: {n} rows, {wall:.1f} s wall, {rate:.2f} rows/s steady",
                      flush=True)
        finally:
            sim.stop()
    print("\n| engine | rows | wall s (incl. start-up) | images/s (wall) | images/s (steady) |")
    print("|---|---|---|---|---|")
    for name, n, wall, rate in rows:
        print(f"| {name} | {n} | {wall:.1f} | {n / wall:.2f} | {rate:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
