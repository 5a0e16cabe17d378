"""Shared fixtures for the black-box tests: the fake gateway and a CLI runner.

``gateway`` starts the fake gateway (tests/fake_gateway/) on 127.0.0.1 in a background thread;
``caption`` runs ``pipeline.cli.main`` in-process against it and reads the output back.
"""

from __future__ import annotations

import csv
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_gateway import Gateway  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "sample"
API_KEY = "sk-test-key-0042"
# Fast retries and a short idle timeout; each test adds what it needs.
FAST = ["--backoff-base", "0.01", "--backoff-max", "0.05", "--read-timeout", "1",
        "--no-progress"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "CAPTION_BASE_URL", "OPENAI_BASE_URL", "HTTP_PROXY",
                 "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CAPTION_API_KEY", API_KEY)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def gateway() -> Any:
    with Gateway() as gw:
        yield gw


def write_manifest(path: Path, rows: list[dict[str, Any]], fields: list[str] | None = None) -> Path:
    """Write a CSV manifest; ``rows`` are dicts (missing keys become empty cells)."""
    if fields is None:
        fields = []
        for r in rows:
            fields += [k for k in r if k not in fields]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in fields})
    return path


def read_out(out: Path) -> Any:
    """The output dataset as a DataFrame (empty when no part file exists yet)."""
    import pandas as pd

    parts = [p for p in Path(out).rglob("*") if p.is_file()
             and not any(seg.startswith((".", "_")) for seg in p.relative_to(out).parts)]
    if not parts:
        return pd.DataFrame()
    return pd.read_parquet(out)


def clean(v: Any) -> Any:
    """NaN/NA -> None, numpy scalars -> Python scalars, arrays (list columns) -> lists."""
    if v is None:
        return None
    if hasattr(v, "tolist") and getattr(v, "ndim", 0) == 1:
        return [clean(x) for x in v.tolist()]
    try:
        import pandas as pd
        if pd.isna(v):
            return None
    except (TypeError, ValueError):
        pass
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


@dataclass
class Result:
    code: int
    df: Any
    out: Path
    stdout: str
    stderr: str

    @property
    def ids(self) -> list[str]:
        return [] if self.df.empty else [str(i) for i in self.df["id"]]

    def row(self, id: str) -> dict[str, Any]:
        """The one output row of ``id`` (fails if there is not exactly one)."""
        assert not self.df.empty, f"no output rows; exit={self.code}; stderr={self.stderr!r}"
        hits = self.df[self.df["id"].astype(str) == id]
        assert len(hits) == 1, f"{len(hits)} rows for id {id!r}: {self.ids}"
        return {k: clean(v) for k, v in hits.iloc[0].to_dict().items()}

    def stderr_lines(self) -> list[str]:
        """Non-empty stderr lines, with the (test-named) tmp path blanked out."""
        text = self.stderr.replace(str(self.out.parent), "<tmp>")
        return [ln for ln in text.splitlines() if ln.strip()]


class Caption:
    """Runs ``caption`` in-process: ``caption(rows, *args)`` -> Result."""

    def __init__(self, gw: Gateway, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
        self.gw, self.tmp, self.capfd = gw, tmp_path, capfd
        self.out = tmp_path / "out"

    def manifest(self, rows: list[dict[str, Any]], name: str = "images.csv",
                 fields: list[str] | None = None) -> Path:
        return write_manifest(self.tmp / name, rows, fields)

    def __call__(self, rows: list[dict[str, Any]] | Path, *args: str, retries: int = 2,
                 concurrency: int = 4, base_url: str | None = "gw") -> Result:
        from pipeline.cli import main

        manifest = rows if isinstance(rows, Path) else self.manifest(rows)
        argv = ["caption", str(manifest), "--out", str(self.out)]
        if base_url:
            argv += ["--base-url", self.gw.base_url if base_url == "gw" else base_url]
        argv += ["--retries", str(retries), "--concurrency", str(concurrency), *FAST, *args]
        self.capfd.readouterr()
        code = main(argv)
        cap = self.capfd.readouterr()
        return Result(code, read_out(self.out), self.out, cap.out, cap.err)


@pytest.fixture
def caption(gateway: Gateway, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> Caption:
    return Caption(gateway, tmp_path, capfd)


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for ``python -m pipeline`` subprocesses (repo on the path)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENAI_API_KEY", "CAPTION_BASE_URL", "OPENAI_BASE_URL")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["CAPTION_API_KEY"] = API_KEY
    env["NO_PROXY"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


def caption_cmd(manifest: Path, out: Path, base_url: str, *args: str) -> list[str]:
    """argv for running the CLI as a subprocess."""
    return [sys.executable, "-m", "pipeline", "caption", str(manifest), "--out", str(out),
            "--base-url", base_url, *FAST, *args]


class SmallDisk:
    """A real, small filesystem (tmpfs) mounted for one test."""

    def __init__(self, path: Path, size: str, readonly: bool = False) -> None:
        import subprocess as sp

        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        opts = f"size={size}" + (",ro" if readonly else "")
        r = sp.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                   capture_output=True, text=True)
        if r.returncode != 0:
            reason = (r.stderr.strip() or "mount failed").splitlines()[0]
            print(f"SKIPPED: cannot mount a small tmpfs here ({reason})")
            pytest.skip(f"cannot mount a small tmpfs here ({reason})")

    def free(self) -> int:
        import shutil

        return shutil.disk_usage(self.path).free

    def fill(self, leave: int, name: str = "filler") -> Path:
        """Write a filler file until only ``leave`` bytes are free."""
        filler = self.path / name
        with open(filler, "ab") as f:
            while (room := self.free() - leave) > 0:
                f.write(b"\0" * min(room, 1 << 20))
                f.flush()
                os.fsync(f.fileno())
        return filler

    def unmount(self) -> None:
        import subprocess as sp

        sp.run(["umount", "-l", str(self.path)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """``small_disk(size="2m", readonly=False)`` → a mounted SmallDisk, unmounted after."""
    disks: list[SmallDisk] = []

    def make(size: str = "2m", readonly: bool = False, name: str = "disk") -> SmallDisk:
        d = SmallDisk(tmp_path / name, size, readonly)
        disks.append(d)
        return d

    yield make
    for d in disks:
        d.unmount()
