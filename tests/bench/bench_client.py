"""`make bench` part 1: client throughput, the pipeline against the openai SDK baseline.

Both clients caption the same manifest (distinct small PNGs, sent inline as data:
URIs) against the same simulator, started fresh for every run in its own process and
set to answer at once (--latency 0 --tokens-per-second 0). Each client runs as its own
process; ``os.wait4`` gives its CPU time (user + system) and peak RSS, so nothing of
the benchmark itself is counted. The baseline is what most users would write around
the official SDK: ``AsyncOpenAI`` streaming under an ``asyncio.Semaphore``, results in
a list, one ``pandas`` Parquet write at the end (``BASELINE_SCRIPT`` below, verbatim).

Runs alternate (pipeline, baseline) per concurrency and repeat; the table shows
medians and the ratios pipeline / baseline. Nothing is pinned to a core.

    python tests/bench/bench_client.py [--images 2000] [--concurrency 64 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
CHILD_ENV = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
             "CAPTION_API_KEY": "sk-bench", "PYTHONDONTWRITEBYTECODE": "1"}
for _proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy",
               "OPENAI_API_KEY", "OPENAI_BASE_URL", "CAPTION_BASE_URL"):
    CHILD_ENV.pop(_proxy, None)

# The same request from both clients: model, prompt, max_tokens, usage in the stream.
MODEL = "claude-3-5-sonnet-20240620"
MAX_TOKENS = 300

BASELINE_SCRIPT = '''\
"""The script most users would write: openai SDK, a semaphore, pandas at the end."""
import asyncio, base64, mimetypes, sys
from pathlib import Path

import pandas as pd
from openai import AsyncOpenAI

manifest, out, base_url, concurrency, model, max_tokens, prompt = sys.argv[1:8]


async def main():
    df = pd.read_csv(manifest)
    root = Path(manifest).parent
    client = AsyncOpenAI(base_url=base_url, api_key="sk-bench")
    sem = asyncio.Semaphore(int(concurrency))

    async def caption(row):
        async with sem:
            path = root / row.image
            b64 = base64.b64encode(path.read_bytes()).decode()
            url = f"data:{mimetypes.guess_type(path.name)[0]};base64,{b64}"
            try:
                stream = await client.chat.completions.create(
                    model=model, max_tokens=int(max_tokens), stream=True,
                    stream_options={"include_usage": True},
                    messages=[{"role": "user", "content": [
                        {"type": "text", "text": prompt},
                        {"type": "image_url", "image_url": {"url": url}}]}])
                parts, usage, finish = [], None, None
                async for chunk in stream:
                    if chunk.choices:
                        choice = chunk.choices[0]
                        if choice.delta and choice.delta.content:
                            parts.append(choice.delta.content)
                        finish = choice.finish_reason or finish
                    if chunk.usage:
                        usage = chunk.usage
                return {"id": row.id, "image": row.image, "caption": "".join(parts),
                        "finish_reason": finish, "status": "ok", "error": None,
                        "prompt_tokens": usage.prompt_tokens if usage else None,
                        "completion_tokens": usage.completion_tokens if usage else None}
            except Exception as e:
                return {"id": row.id, "image": row.image, "status": "error", "error": str(e)}

    results = await asyncio.gather(*(caption(r) for r in df.itertuples()))
    pd.DataFrame(results).to_parquet(out)
    await client.close()


asyncio.run(main())
'''


# ---------------------------------------------------------------- inputs


def make_images(folder: Path, n: int, seed: int = 0, size: int = 64) -> list[Path]:
    """``n`` distinct small PNGs (smooth colour fields, a few hundred bytes to ~2 KB)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        p = folder / f"i{i:05d}.png"
        paths.append(p)
        if p.exists():
            continue
        im = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
        d = ImageDraw.Draw(im)
        for _ in range(3):
            x0, y0 = rng.randrange(size), rng.randrange(size)
            d.rectangle([x0, y0, x0 + rng.randrange(8, 40), y0 + rng.randrange(8, 40)],
                        fill=tuple(rng.randrange(256) for _ in range(3)))
        d.point((i % size, (i // size) % size), fill=(i % 251, 7, 11))  # distinct bytes
        im.save(p, optimize=False)
    return paths


def write_manifest(path: Path, rows: int, images: list[Path], start: int = 0) -> Path:
    """``id,image`` rows r<start>..; image paths relative to the manifest, cycling."""
    rel = [os.path.relpath(p, path.parent) for p in images]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "image"])
    with path.open("w", encoding="utf-8") as f:
        for i in range(start, start + rows):
            w.writerow([f"r{i:07d}", rel[i % len(rel)]])
            if buf.tell() > 1 << 20:
                f.write(buf.getvalue())
                buf.seek(0)
                buf.truncate()
        f.write(buf.getvalue())
    return path


# ---------------------------------------------------------------- processes


@dataclass
class Child:
    """How a child process went: wall time, CPU (user + system) and peak RSS."""

    returncode: int
    wall_s: float
    cpu_s: float
    maxrss_mb: float
    started: float  # time.monotonic() just before spawning
    stderr: str = ""
    stdout: str = ""


# Peak RSS is measured from a small intermediate process. ``ru_maxrss`` of a child
# includes the memory of the process it was forked (or vforked) from, up to its exec:
# spawned straight from this benchmark, after it generated a million rows, a client
# would be charged for the benchmark's own memory. The intermediate is a bare
# interpreter (~10 MB, less than any client), so the figure is the client's own.
_MEASURE = """\
import json, os, sys, time
t0 = time.monotonic()
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, status, ru = os.wait4(pid, 0)
wall = time.monotonic() - t0
with open(sys.argv[1], "w") as f:
    json.dump([os.waitstatus_to_exitcode(status), wall, ru.ru_utime + ru.ru_stime,
               ru.ru_maxrss, t0], f)
"""


def run_child(argv: list[str], cwd: Path, timeout: float = 600.0) -> Child:
    """Run ``argv`` (argv[0] an absolute path): wall, CPU and peak RSS of that process."""
    with tempfile.TemporaryDirectory(prefix="bench-child-") as tmp:
        result = Path(tmp) / "result.json"
        out_p, err_p = Path(tmp) / "stdout", Path(tmp) / "stderr"
        with out_p.open("wb") as out_f, err_p.open("wb") as err_f:
            proc = subprocess.Popen([PY, "-I", "-S", "-c", _MEASURE, str(result), *argv],
                                    cwd=cwd, env=CHILD_ENV, stdout=out_f, stderr=err_f,
                                    start_new_session=True)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise TimeoutError(f"{' '.join(argv[:4])} ... ran over {timeout:g} s") from None
        stderr = err_p.read_text(errors="replace")[-4000:]
        if proc.returncode != 0 or not result.exists():
            raise RuntimeError(f"measuring {argv[:4]} failed: {stderr}")
        rc, wall, cpu, maxrss_kb, t0 = json.loads(result.read_text())
        return Child(rc, wall, cpu, maxrss_kb / 1024, t0, stderr,
                     out_p.read_text(errors="replace")[-4000:])


# The simulator's captions are one or two sentences (~30 word pieces). The issue asks
# for ~100 tokens a caption, so the benchmark's simulator process repeats the caption
# text up to exactly N pieces (usage counts them as usual); 0 keeps the natural length.
CAPTION_TOKENS = 100
_SIM_LAUNCHER = """\
import math, sys
from pipeline.simulator import app as simulator
from pipeline.simulator import cli
from pipeline.simulator.captions import split_tokens

n, natural = int(sys.argv[1]), simulator.caption_for


def caption_for(prompt, seed, variant=0):
    text = natural(prompt, seed, variant)
    pieces = split_tokens(text)
    if n <= 0 or len(pieces) == n:
        return text
    return "".join(split_tokens(" ".join([text] * math.ceil(n / len(pieces))))[:n])


simulator.caption_for = caption_for
sys.exit(cli.main(sys.argv[2:]))
"""


class SimProcess:
    """The simulator in its own process, answering at once by default."""

    def __init__(self, latency: float = 0.0, tokens_per_second: float = 0.0,
                 caption_tokens: int = CAPTION_TOKENS) -> None:
        self._err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [PY, "-c", _SIM_LAUNCHER, str(caption_tokens), "--port", "0",
             "--latency", str(latency), "--tokens-per-second", str(tokens_per_second)],
            cwd=REPO, env=CHILD_ENV, stdout=subprocess.PIPE, stderr=self._err, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.kill()
            self.proc.wait()
            self._err.seek(0)
            raise RuntimeError(f"simulator did not start: {line!r} "
                               f"{self._err.read().decode(errors='replace')[-2000:]}")
        self.url = line.split("listening on", 1)[1].strip()

    def cpu(self) -> float:
        """CPU seconds (user + system) the simulator has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        if self.proc.stdout:
            self.proc.stdout.close()
        self._err.close()

    def __enter__(self) -> SimProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.returncode is None:
            self.stop()


def pipeline_argv(manifest: Path, out: Path, url: str, concurrency: int,
                  *extra: str) -> list[str]:
    return [PY, "-m", "pipeline", "caption", str(manifest), "--out", str(out),
            "--base-url", url, "--model", MODEL, "--max-tokens", str(MAX_TOKENS),
            "--no-progress", "--concurrency", str(concurrency), "--status-interval", "3600",
            *extra]


# ---------------------------------------------------------------- throughput


@dataclass
class Sample:
    client: str
    concurrency: int
    images: int
    ok: int
    wall_s: float
    cpu_s: float
    maxrss_mb: float
    sim_cpu_s: float
    tokens_per_caption: float

    @property
    def images_per_s(self) -> float:
        return self.ok / self.wall_s

    @property
    def cpu_per_1k(self) -> float:
        return 1000 * self.cpu_s / max(1, self.ok)


def _read_result(out: Path) -> tuple[int, float]:
    """(ok rows, median completion tokens) of a Parquet file or dataset."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    t = ds.dataset(out, format="parquet").to_table(columns=["status", "completion_tokens"])
    ok = t.filter(pc.equal(t["status"], "ok"))
    tokens = [v for v in ok["completion_tokens"].to_pylist() if v is not None]
    return ok.num_rows, float(statistics.median(tokens)) if tokens else float("nan")


def run_once(client: str, concurrency: int, manifest: Path, images: int, work: Path,
             tag: str, caption_tokens: int = CAPTION_TOKENS) -> Sample:
    from pipeline.settings import DEFAULT_PROMPT

    with SimProcess(caption_tokens=caption_tokens) as sim:
        sim_cpu = sim.cpu()
        if client == "pipeline":
            out = work / f"out-{tag}"
            child = run_child(pipeline_argv(manifest, out, sim.url, concurrency), REPO)
        else:
            out = work / f"baseline-{tag}.parquet"
            child = run_child([PY, str(work / "baseline.py"), str(manifest), str(out), sim.url,
                               str(concurrency), MODEL, str(MAX_TOKENS), DEFAULT_PROMPT], REPO)
        sim_cpu = sim.cpu() - sim_cpu
    if child.returncode != 0:
        raise RuntimeError(f"{client} exited {child.returncode}: {child.stderr}")
    ok, tokens = _read_result(out)
    if ok != images:
        raise RuntimeError(f"{client} captioned {ok} of {images} images: {child.stderr}")
    return Sample(client, concurrency, images, ok, child.wall_s, child.cpu_s, child.maxrss_mb,
                  sim_cpu, tokens)


@dataclass
class ThroughputResult:
    images: int
    repeats: int
    samples: list[Sample] = field(default_factory=list)

    def median(self, client: str, conc: int, attr: str) -> float:
        vals = [getattr(s, attr) for s in self.samples
                if s.client == client and s.concurrency == conc]
        return statistics.median(vals) if vals else float("nan")

    def clients(self) -> list[str]:
        return [c for c in ("pipeline", "baseline") if any(s.client == c for s in self.samples)]

    def concurrencies(self) -> list[int]:
        return sorted({s.concurrency for s in self.samples})


def bench_throughput(images: int = 2000, concurrencies: tuple[int, ...] = (64, 256),
                     repeats: int = 3, baseline: bool = True,
                     caption_tokens: int = CAPTION_TOKENS, log: Any = print
                     ) -> ThroughputResult:
    with tempfile.TemporaryDirectory(prefix="bench-client-") as tmp:
        work = Path(tmp)
        paths = make_images(work / "img", images)
        manifest = write_manifest(work / "manifest.csv", images, paths)
        (work / "baseline.py").write_text(BASELINE_SCRIPT)
        result = ThroughputResult(images, repeats)
        clients = ["pipeline", "baseline"] if baseline else ["pipeline"]
        for rep in range(repeats):
            for conc in concurrencies:
                for client in clients if rep % 2 == 0 else clients[::-1]:
                    s = run_once(client, conc, manifest, images, work, f"{conc}-{rep}",
                                 caption_tokens)
                    result.samples.append(s)
                    log(f"  {client:<8} c={conc:<4} run {rep + 1}/{repeats}: "
                        f"{s.images_per_s:7.0f} img/s  {s.cpu_per_1k:5.2f} CPU s/1k  "
                        f"{s.maxrss_mb:5.0f} MB  (simulator {s.sim_cpu_s / s.wall_s:.0%} "
                        f"of a core)", flush=True)
    return result


def throughput_table(r: ThroughputResult) -> str:
    first = r.median(r.clients()[0], r.concurrencies()[0], "tokens_per_caption")
    lines = [f"Client throughput: {r.images} images (64x64 PNG, distinct), simulator answering "
             f"at once, ~{first:.0f} tokens per caption; medians of {r.repeats} runs",
             "",
             "| client | concurrency | images/s | client CPU s / 1k images | peak RSS MB "
             "| simulator CPU, % of a core |",
             "|---|---:|---:|---:|---:|---:|"]
    for conc in r.concurrencies():
        for client in r.clients():
            sim_share = statistics.median(s.sim_cpu_s / s.wall_s for s in r.samples
                                          if s.client == client and s.concurrency == conc)
            lines.append(f"| {client} | {conc} | {r.median(client, conc, 'images_per_s'):.0f} | "
                         f"{r.median(client, conc, 'cpu_per_1k'):.2f} | "
                         f"{r.median(client, conc, 'maxrss_mb'):.0f} | {100 * sim_share:.0f} |")
        if "baseline" in r.clients():
            ratio = {a: r.median("pipeline", conc, a) / r.median("baseline", conc, a)
                     for a in ("images_per_s", "cpu_per_1k", "maxrss_mb")}
            lines.append(f"| **pipeline / baseline** | {conc} | **{ratio['images_per_s']:.2f}x** "
                         f"| **{ratio['cpu_per_1k']:.2f}x** | **{ratio['maxrss_mb']:.2f}x** | |")
    return "\n".join(lines)


def throughput_targets(r: ThroughputResult) -> list[tuple[str, bool, str]]:
    if "baseline" not in r.clients():
        return []
    conc = max(r.concurrencies())
    speed = r.median("pipeline", conc, "images_per_s") / r.median("baseline", conc, "images_per_s")
    cpu = r.median("pipeline", conc, "cpu_per_1k") / r.median("baseline", conc, "cpu_per_1k")
    return [(f"throughput >= 2x the baseline at concurrency {conc}", speed >= 2,
             f"{speed:.2f}x"),
            (f"CPU per image <= 1/2 the baseline's at concurrency {conc}", cpu <= 0.5,
             f"{cpu:.2f}x")]


def targets_table(rows: list[tuple[str, bool, str]]) -> str:
    lines = ["| target | measured | met |", "|---|---:|---|"]
    lines += [f"| {name} | {value} | {'yes' if ok else '**no**'} |" for name, ok, value in rows]
    return "\n".join(lines)


def have_openai() -> bool:
    try:
        import openai  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--caption-tokens", type=int, default=CAPTION_TOKENS,
                   help="word pieces per simulated caption (0: the simulator's natural ~30)")
    p.add_argument("--no-baseline", action="store_true", help="pipeline only")
    p.add_argument("--json", type=Path, help="also write the samples here")
    args = p.parse_args(argv)
    baseline = not args.no_baseline
    if baseline and not have_openai():
        print("the baseline needs the openai package: pip install openai "
              "(or pass --no-baseline)", file=sys.stderr)
        return 2
    print(f"client throughput: {args.images} images, concurrency {args.concurrency}, "
          f"{args.repeats} repeats", flush=True)
    r = bench_throughput(args.images, tuple(args.concurrency), args.repeats, baseline,
                         args.caption_tokens)
    print()
    print(throughput_table(r))
    targets = throughput_targets(r)
    if targets:
        print()
        print(targets_table(targets))
    if args.json:
        args.json.write_text(json.dumps([asdict(s) for s in r.samples], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
