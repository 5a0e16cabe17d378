"""Jobs and operations, black-box: TOML job files (`run`, `make caption JOB=`), named
prompts, unattended output (status lines, JSON lines), run reports, `status`, prices
and cost, the --max-cost stop that resumes, and --dry-run.

Everything runs against the scripted loopback gateway (tests/fake_gateway/); a few
runs are real subprocesses (cron-style, no TTY) and one goes through `make`.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import API_KEY, FAST, REPO, SAMPLES, clean, read_out, subprocess_env, write_manifest
from fake_gateway import LOCAL_CAPTION, USAGE_OK, default_caption, img

# --------------------------------------------------------------------------- helpers

SECRET = "sk-test-REPORT-SECRET-77"
OK_IN, OK_OUT = USAGE_OK["prompt_tokens"], USAGE_OK["completion_tokens"]  # 1000, 5


def write_job(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def main_run(capfd: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``pipeline.cli.main(argv)`` in-process -> (exit code, stdout, stderr)."""
    import pipeline.commands.dryrun
    import pipeline.run.progress
    from pipeline.cli import main

    # dry_run() and Progress() bind sys.stdout / sys.stderr as default arguments at import
    # time; under pytest those are an earlier test's (closed) capture: use the current ones.
    patched = {pipeline.commands.dryrun.dry_run: sys.stdout,
               pipeline.run.progress.Progress.__init__:
               sys.stderr}
    saved = {f: f.__defaults__ for f in patched}
    for f, stream in patched.items():
        f.__defaults__ = tuple(stream if hasattr(d, "write") else d for d in f.__defaults__)
    capfd.readouterr()
    try:
        code = main(list(argv))
    finally:
        for f, d in saved.items():
            f.__defaults__ = d
    cap = capfd.readouterr()
    return code, cap.out, cap.err


def lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def tiny_pngs(folder: Path, n: int) -> list[str]:
    """``n`` small, distinct PNG files in ``folder``; returns their file names."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"im{i}.png"
        Image.new("RGB", (16 + i, 12), (40 * i % 256, 90, 200)).save(folder / name)
        names.append(name)
    return names


def url_rows(count: int, scenario: str = "ok", **query: Any) -> list[dict[str, str]]:
    return [{"id": f"r{i:02d}", "image": img(scenario, f"{i:02d}.jpg", **query)}
            for i in range(count)]


def reports(out: Path) -> list[dict[str, Any]]:
    """The run reports in OUT/_runs, oldest first (by start time)."""
    docs = [json.loads(p.read_text(encoding="utf-8")) for p in (out / "_runs").glob("*.json")]
    return sorted(docs, key=lambda r: r["started_at"])


def keys(df: Any) -> list[tuple[str, str]]:
    return sorted(zip(df["id"].astype(str), df["prompt_name"].astype(str)))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` (hidden ones too) with its size and mtime."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def run_proc(cmd: list[str], cwd: Path = REPO, timeout: float = 60,
             **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=subprocess_env(**env), capture_output=True,
                          text=True, timeout=timeout)


TQDM_BAR = re.compile(r"\d+%\||\|\s*\d+/\d+ \[|it/s\]|img/s\]|[\r\u2588-\u258f]")


# --------------------------------------------------------------------------- job files


def test_job_file_run_in_process_produces_rows(gateway, tmp_path, capfd):
    rows = url_rows(3)
    (tmp_path / "jobdir").mkdir()
    write_manifest(tmp_path / "jobdir" / "images.csv", rows)
    job = write_job(tmp_path / "jobdir" / "nightly.toml", f"""
manifest = "images.csv"
out = "results"
[api]
base_url = "{gateway.base_url}"
model = "gpt-4o-mini"
max_tokens = 77
temperature = 0.3
[limits]
concurrency = 2
retries = 1
[output]
flush_rows = 1
""")
    code, out, err = main_run(capfd, "run", str(job), *FAST)
    assert code == 0, err
    df = read_out(tmp_path / "jobdir" / "results")
    assert sorted(df["id"]) == ["r00", "r01", "r02"]
    assert dict(zip(df["image"], df["caption"])) == {r["image"]: default_caption(r["image"])
                                                     for r in rows}
    assert set(df["prompt_name"]) == {"default"}
    assert gateway.count() == 3
    bodies = [c.body for c in gateway.calls()]
    assert {b["model"] for b in bodies} == {"gpt-4o-mini"}
    assert {b["max_tokens"] for b in bodies} == {77}
    assert {b["temperature"] for b in bodies} == {0.3}
    assert "summary: ok=3 failed=0" in out


@pytest.mark.slow
def test_make_caption_job_with_args_overriding_base_url_and_out(gateway, tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    if not (REPO / ".venv" / "bin" / "python").exists():
        pytest.skip("no .venv: `make caption` would create it (pip, network)")
    write_manifest(tmp_path / "images.csv", url_rows(2))
    job = write_job(tmp_path / "job.toml", """
manifest = "images.csv"
out = "from-job-file"
[api]
base_url = "http://127.0.0.1:9/v1"
max_tokens = 40
[limits]
retries = 0
""")
    out = tmp_path / "from-args"
    # `-o .venv/.installed`: never reinstall the venv here (pyproject.toml may be newer
    # than the stamp); what is under test is the `caption` recipe with JOB= and ARGS=.
    proc = run_proc(["make", "-o", ".venv/.installed", "caption", f"JOB={job}",
                     f"ARGS=--base-url {gateway.base_url} --out {out}"], timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(read_out(out)["id"]) == ["r00", "r01"]
    assert not (tmp_path / "from-job-file").exists()
    assert gateway.count() == 2
    assert {c.body["max_tokens"] for c in gateway.calls()} == {40}  # the rest is the job's
    assert "summary: ok=2 failed=0" in proc.stdout


def test_command_line_option_overrides_the_job_file(gateway, tmp_path, capfd):
    write_manifest(tmp_path / "m.csv", url_rows(2))
    job = write_job(tmp_path / "job.toml", f"""
manifest = "m.csv"
out = "out"
[api]
base_url = "{gateway.base_url}"
model = "claude-3-5-haiku-20241022"
max_tokens = 50
""")
    code, _, err = main_run(capfd, "run", str(job), "--model", "gpt-4.1-mini",
                            "--max-tokens", "12", *FAST)
    assert code == 0, err
    bodies = [c.body for c in gateway.calls()]
    assert len(bodies) == 2
    assert {b["model"] for b in bodies} == {"gpt-4.1-mini"}
    assert {b["max_tokens"] for b in bodies} == {12}
    report = reports(tmp_path / "out")[0]
    assert report["options"]["model"] == "gpt-4.1-mini"
    assert report["options"]["max_tokens"] == 12


def test_relative_paths_resolve_against_the_job_folder(gateway, tmp_path, capfd, monkeypatch):
    data = tmp_path / "project" / "data"
    names = tiny_pngs(data / "pics", 2)  # also creates data/
    write_manifest(data / "m.csv", [{"id": n, "image": f"pics/{n}"} for n in names])
    write_job(tmp_path / "project" / "jobs" / "nightly" / "job.toml", f"""
manifest = "../../data/m.csv"
out = "../../out/nightly"
[api]
base_url = "{gateway.base_url}"
""")
    elsewhere = tmp_path / "elsewhere" / "deep"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    code, _, err = main_run(capfd, "run", "../../project/jobs/nightly/job.toml", *FAST)
    assert code == 0, err
    df = read_out(tmp_path / "project" / "out" / "nightly")
    assert sorted(df["id"]) == sorted(names)
    assert set(df["caption"]) == {LOCAL_CAPTION}
    assert all(c.url.startswith("data:image/png;base64,") for c in gateway.calls())
    assert list(elsewhere.iterdir()) == []            # nothing landed in the cwd
    assert not (tmp_path / "elsewhere" / "out").exists()


BAD_JOBS = {
    # case: (toml text after the manifest line, the key named, more words in the line)
    "unknown_top_level_key": ('outt = "x"\n', "outt", ["unknown"]),
    "unknown_key_in_section": ('[api]\nmodle = "gpt-4o"\n', "modle", ["unknown", "[api]"]),
    "unknown_section": ('[limitz]\nconcurrency = 4\n', "limitz", ["unknown"]),
    "wrong_type": ('[limits]\nconcurrency = "8"\n', "concurrency", ["integer"]),
    "wrong_type_bool_for_int": ('[images]\nmax_edge = true\n', "max_edge", ["integer"]),
    "api_key_in_section": (f'[api]\napi_key = "{SECRET}"\n', "api_key", ["CAPTION_API_KEY"]),
    "api_key_top_level": (f'api_key = "{SECRET}"\n', "api_key", ["CAPTION_API_KEY"]),
}


@pytest.mark.parametrize("case", sorted(BAD_JOBS))
def test_bad_job_file_exits_2_with_one_line_naming_key_and_file(gateway, tmp_path, capfd,
                                                                 case):
    body, key, words = BAD_JOBS[case]
    write_manifest(tmp_path / "m.csv", url_rows(1))
    job = write_job(tmp_path / f"bad-{case}.toml",
                    f'manifest = "m.csv"\n{body}')
    code, out, err = main_run(capfd, "run", str(job), "--base-url", gateway.base_url,
                              "--out", str(tmp_path / "out"), *FAST)
    assert code == 2
    assert "Traceback" not in err
    err_lines = lines(err)
    assert len(err_lines) == 1, err
    line = err_lines[0]
    assert line.startswith("error: ")
    assert key in line
    assert str(job) in line
    for w in words:
        assert w in line
    assert SECRET not in err + out
    assert gateway.count() == 0
    assert not (tmp_path / "out").exists()


def test_manifest_of_wrong_type_exits_2_naming_key_and_file(tmp_path, capfd):
    job = write_job(tmp_path / "job.toml", 'manifest = 5\n')
    try:
        code, _, err = main_run(capfd, "run", str(job))
    except TypeError as e:  # escapes main(): a traceback on the command line
        pytest.fail(f"main() raised {e!r}")
    assert code == 2
    (line,) = lines(err)
    assert "manifest" in line and str(job) in line


def test_example_job_parses_and_all_its_prompts_are_used(gateway, tmp_path, capfd,
                                                          monkeypatch):
    from pipeline.commands.jobfile import job_argv

    argv = job_argv(REPO / "jobs" / "example.toml")
    assert Path(argv[0]).resolve() == (SAMPLES / "images.csv").resolve()
    flags = dict(zip(argv[1::2], argv[2::2]))
    assert Path(flags["--out"]).resolve() == (REPO / "out" / "example").resolve()
    assert flags["--model"] == "claude-3-5-sonnet-20240620"
    assert (flags["--max-cost"], flags["--price-in"], flags["--price-out"]) == \
        ("5.0", "3.0", "15.0")
    prompts = [v for f, v in zip(argv, argv[1:]) if f == "--named-prompt"]
    assert [p.split("=", 1)[0] for p in prompts] == ["short", "detailed", "tags"]

    # and it runs as shipped, from the repo root, with only the endpoint and OUT changed
    monkeypatch.chdir(REPO)
    out = tmp_path / "example"
    code, stdout, err = main_run(capfd, "run", "jobs/example.toml", "--base-url",
                                 gateway.base_url, "--out", str(out), "--rpm", "100000",
                                 *FAST)
    assert code == 0, err
    df = read_out(out)
    manifest_ids = [ln.split(",")[0] for ln in
                    (SAMPLES / "images.csv").read_text().splitlines()[1:] if ln.strip()]
    assert len(manifest_ids) == 8
    assert keys(df) == sorted((i, p) for i in manifest_ids
                              for p in ("short", "detailed", "tags"))
    sent = Counter(c.prompt_text for c in gateway.calls())
    assert sent["Write one factual caption for this image in a single sentence."] == 8
    assert sent["Describe this image in detail: subject, setting, lighting, colours and "
                "any text."] == 8
    # {source} is rendered from each row's manifest column
    with open(SAMPLES / "images.csv", newline="", encoding="utf-8") as f:
        sources = Counter(r["source"] for r in csv.DictReader(f))
    assert sources["NASA (public domain)"] == 2
    assert {k: v for k, v in sent.items() if k.startswith("List 5 to 10")} == {
        f"List 5 to 10 comma-separated tags for this image (source: {s})." : n
        for s, n in sources.items()}
    assert all("{source}" not in k for k in sent)
    assert gateway.count() == 24
    # the job's price: 3 / 15 USD per million tokens
    ok = df[df["status"] == "ok"]
    assert ok["cost_usd"].tolist() == pytest.approx([(OK_IN * 3 + OK_OUT * 15) / 1e6] * 24)


# --------------------------------------------------------------------------- named prompts


PROMPTS = {"short": "One sentence, please.", "tags": "Five tags.",
           "alt": "Alt text for {id}."}


def _named(prompts: dict[str, str]) -> list[str]:
    return [a for n, t in prompts.items() for a in ("--named-prompt", f"{n}={t}")]


def test_named_prompts_one_row_per_pair_image_prepared_once(gateway, tmp_path, capfd,
                                                            monkeypatch):
    import pipeline.images.load as images_mod

    names = tiny_pngs(tmp_path / "pics", 3)
    manifest = write_manifest(tmp_path / "m.csv",
                              [{"id": n.removesuffix(".png"), "image": f"pics/{n}"}
                               for n in names])
    loads: Counter[str] = Counter()
    prepares: Counter[int] = Counter()
    real_load, real_prepare = images_mod.ImageSource._load_local, images_mod.prepare

    def counting_load(self, ref):  # type: ignore[no-untyped-def]
        loads[ref] += 1
        return real_load(self, ref)

    def counting_prepare(data, policy):  # type: ignore[no-untyped-def]
        prepares[len(data)] += 1
        return real_prepare(data, policy)

    monkeypatch.setattr(images_mod.ImageSource, "_load_local", counting_load)
    monkeypatch.setattr(images_mod, "prepare", counting_prepare)
    out = tmp_path / "out"
    code, _, err = main_run(capfd, "caption", str(manifest), "--out", str(out), "--base-url",
                            gateway.base_url, "--concurrency", "4", *_named(PROMPTS), *FAST)
    assert code == 0, err
    ids = ["im0", "im1", "im2"]
    df = read_out(out)
    assert keys(df) == sorted((i, p) for i in ids for p in PROMPTS)
    assert set(df["caption"]) == {LOCAL_CAPTION}
    # each request carries its own prompt text with the right image
    uri_to_id = {}
    for c in gateway.calls():
        uri_to_id.setdefault(c.url, set()).add(c.prompt_text)
    assert len(uri_to_id) == 3
    assert all(texts >= {PROMPTS["short"], PROMPTS["tags"]} for texts in uri_to_id.values())
    alt_texts = sorted(t for texts in uri_to_id.values() for t in texts if t.startswith("Alt"))
    assert alt_texts == [f"Alt text for {i}." for i in ids]
    assert gateway.count() == 9
    # the image was read and prepared once per manifest row, not once per prompt
    assert loads == Counter({f"pics/{n}": 1 for n in names})
    assert sum(prepares.values()) == 3


def test_adding_a_prompt_resumes_per_pair_only_new_pairs_requested(gateway, tmp_path, capfd):
    manifest = write_manifest(tmp_path / "m.csv", url_rows(2))
    out = tmp_path / "out"
    base = ["caption", str(manifest), "--out", str(out), "--base-url", gateway.base_url, *FAST]
    code, _, err = main_run(capfd, *base, *_named({"short": "S?"}))
    assert code == 0, err
    assert gateway.count() == 2
    gateway.clear()
    code, stdout, err = main_run(capfd, *base, *_named({"short": "S?", "long": "L?"}))
    assert code == 0, err
    assert [c.prompt_text for c in gateway.calls()] == ["L?", "L?"]
    assert sorted(c.url for c in gateway.calls()) == sorted(r["image"] for r in url_rows(2))
    df = read_out(out)
    assert keys(df) == [("r00", "long"), ("r00", "short"), ("r01", "long"), ("r01", "short")]
    assert "ok=2 failed=0 skipped=2 (already done)" in stdout


def test_retry_errors_redoes_only_the_failed_pair(gateway, tmp_path, capfd):
    state = {"fail": True}

    async def by_prompt(ctx):  # type: ignore[no-untyped-def]
        if state["fail"] and "/one." in ctx.url and ctx.rec.prompt_text == "B?":
            return await ctx.json_response(400, {"error": {
                "message": "Unsupported parameter: foo", "type": "invalid_request_error",
                "code": None}})
        return await ctx.ok(f"{ctx.rec.prompt_text} {ctx.url}")

    gateway.on("pp", by_prompt)
    rows = [{"id": "one", "image": img("pp", "one.jpg")},
            {"id": "two", "image": img("pp", "two.jpg")}]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    base = ["caption", str(manifest), "--out", str(out), "--base-url", gateway.base_url,
            *_named({"a": "A?", "b": "B?"}), *FAST]
    code, _, err = main_run(capfd, *base)
    assert code == 1, err
    df = read_out(out)
    failed = df[df["status"] == "error"]
    assert keys(failed) == [("one", "b")]
    assert failed["error_class"].tolist() == ["bad_request"]

    state["fail"] = False
    gateway.clear()
    code, stdout, err = main_run(capfd, *base, "--retry-errors")
    assert code == 0, err
    assert [(c.url, c.prompt_text) for c in gateway.calls()] == [(rows[0]["image"], "B?")]
    df = read_out(out)
    assert keys(df) == [("one", "a"), ("one", "b"), ("two", "a"), ("two", "b")]
    assert set(df["status"]) == {"ok"}
    fixed = df[(df["id"] == "one") & (df["prompt_name"] == "b")]
    assert fixed["caption"].tolist() == [f"B? {rows[0]['image']}"]


# --------------------------------------------------------------------------- unattended output


@pytest.mark.slow
def test_cron_style_run_without_tty_logs_status_lines_not_a_bar(gateway, tmp_path):
    rows = url_rows(6, "slow", n=10, pace=0.05)  # ~0.5 s a row
    write_manifest(tmp_path / "m.csv", rows)
    job = write_job(tmp_path / "job.toml", f"""
manifest = "m.csv"
out = "out"
[api]
base_url = "{gateway.base_url}"
[limits]
concurrency = 2
""")
    # like the crontab line: no --no-progress; stderr is a pipe, not a TTY
    proc = run_proc([sys.executable, "-m", "pipeline", "run", str(job),
                     "--status-interval", "0.2"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert not TQDM_BAR.search(proc.stderr), proc.stderr
    status = [ln for ln in lines(proc.stderr) if ln.startswith("progress: ")]
    assert status, proc.stderr
    pat = re.compile(r"progress: (\d+)/\d+ rows, ok=(\d+) failed=0, [\d.]+ img/s, "
                     r"\d+ req/min, \d+ tokens/min")
    done = [int(pat.fullmatch(ln).group(1)) for ln in status]  # type: ignore[union-attr]
    assert done == sorted(done) and done[0] < 6    # logged while the run was going (timer)
    assert lines(proc.stdout)[-1].startswith("summary: ok=6 failed=0")
    assert len(read_out(tmp_path / "out")) == 6


def test_status_line_every_interval_even_while_no_row_finishes(gateway, tmp_path, capfd):
    manifest = write_manifest(tmp_path / "m.csv", url_rows(1, "slow", n=3, pace=0.25))
    code, _, err = main_run(capfd, "caption", str(manifest), "--out", str(tmp_path / "out"),
                            "--base-url", gateway.base_url, "--status-interval", "0.2",
                            "--backoff-base", "0.01", "--read-timeout", "5")
    assert code == 0, err
    # one row streaming for ~2 s with a 0.2 s interval: several heartbeats expected
    assert sum(ln.startswith("progress: ") for ln in lines(err)) >= 4, err


def test_log_format_json_status_and_summary_are_json_lines(gateway, tmp_path, capfd):
    rows = url_rows(3, "slow", n=5, pace=0.04) + [{"id": "bad", "image": img("bad400")}]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    code, stdout, err = main_run(capfd, "caption", str(manifest), "--out",
                                 str(tmp_path / "out"), "--base-url", gateway.base_url,
                                 "--concurrency", "1", "--log-format", "json",
                                 "--status-interval", "0.05", *FAST)
    assert code == 1, err
    assert not any(ln.startswith(("progress:", "summary:")) for ln in lines(err + stdout))
    events = []
    for ln in lines(err) + lines(stdout):
        if ln.lstrip().startswith("{"):
            doc = json.loads(ln)
            assert {"event", "ok", "failed"} <= set(doc), ln
            events.append(doc)
    progress = [e for e in events if e["event"] == "progress"]
    assert progress, err
    assert all(e["ok"] + e["failed"] == e["finished"] for e in progress)
    summary = json.loads(lines(stdout)[-1])
    assert summary["event"] == "summary"
    assert (summary["ok"], summary["failed"]) == (3, 1)
    assert summary["error_classes"] == {"bad_image": 1}
    assert summary["tokens_in"] == 3 * OK_IN and summary["tokens_out"] == 3 * OK_OUT
    assert summary["out"] == str(tmp_path / "out")


# --------------------------------------------------------------------------- run reports


def test_run_report_has_timings_counts_costs_and_no_api_key(gateway, tmp_path, capfd,
                                                             monkeypatch):
    monkeypatch.setenv("CAPTION_API_KEY", SECRET)
    rows = url_rows(3, "slow", n=4, pace=0.02) + [{"id": "bad", "image": img("bad400")}]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    code, stdout, err = main_run(capfd, "caption", str(manifest), "--out", str(out),
                                 "--base-url", gateway.base_url, "--price-in", "3",
                                 "--price-out", "7", "--concurrency", "2", *FAST)
    assert code == 1, err
    assert {c.headers.get("Authorization") for c in gateway.calls()} == {f"Bearer {SECRET}"}
    files = list((out / "_runs").glob("*.json"))
    assert len(files) == 1
    text = files[0].read_text(encoding="utf-8")
    assert SECRET not in text and API_KEY not in text
    r = json.loads(text)
    assert r["run_id"] == files[0].stem
    started, ended = (datetime.fromisoformat(r[k]) for k in ("started_at", "ended_at"))
    assert started.tzinfo is not None and started <= ended
    assert (ended - started).total_seconds() < 60
    assert r["exit_code"] == 1
    assert (r["ok"], r["failed"], r["skipped_done"]) == (3, 1, 0)
    assert r["error_classes"] == {"bad_image": 1}
    assert (r["tokens_in"], r["tokens_out"]) == (3 * OK_IN, 3 * OK_OUT)
    assert r["cost_usd"] == pytest.approx(3 * (OK_IN * 3 + OK_OUT * 7) / 1e6)
    for name in ("latency_s", "ttft_s"):
        pct = r[name]
        assert set(pct) == {"p50", "p95", "p99"}
        assert 0 < pct["p50"] <= pct["p95"] <= pct["p99"] < 30, (name, pct)
    assert r["latency_s"]["p99"] >= 0.06         # the slow rows stream 4 pieces, 0.02 s apart
    assert r["images_per_s"] > 0
    assert r["images_per_s"] == pytest.approx(4 / r["wall_s"], rel=0.01)
    opts = r["options"]
    assert "api_key" not in opts
    assert opts["base_url"] == gateway.base_url and opts["manifest"] == str(manifest)
    assert (opts["price_in"], opts["price_out"], opts["concurrency"]) == (3.0, 7.0, 2)
    assert "Secret" not in text


# --------------------------------------------------------------------------- status


def test_status_prints_done_failed_pending_and_the_runs(gateway, tmp_path, capfd):
    rows = url_rows(3) + [{"id": "bad", "image": img("bad400")},
                          {"id": "later", "image": img("ok", "later.jpg")}]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    base = ["caption", str(manifest), "--out", str(out), "--base-url", gateway.base_url,
            "--concurrency", "1", *FAST]
    assert main_run(capfd, *base, "--limit", "2")[0] == 0
    assert main_run(capfd, *base, "--limit", "2")[0] == 1
    code, stdout, err = main_run(capfd, "status", str(out), "--manifest", str(manifest))
    assert code == 0, err
    got = lines(stdout)
    assert got[0] == f"{out}: 3 ok, 1 failed (bad_image=1)"
    assert got[1] == f"{manifest}: 5 rows x 1 prompt(s), 1 pending"
    runs = got[2:]
    assert len(runs) == 2
    by_id = {re.match(r"run (\S+):", ln).group(1): ln for ln in runs}  # type: ignore[union-attr]
    assert set(by_id) == {p.stem for p in (out / "_runs").glob("*.json")}
    summaries = sorted(re.search(r"exit (\d+), ok=(\d+) failed=(\d+) skipped=(\d+)", ln)
                       .groups() for ln in runs)  # type: ignore[union-attr]
    assert summaries == [("0", "2", "0", "0"), ("1", "1", "1", "2")]
    # the numbers match the data
    df = read_out(out)
    assert Counter(df["status"]) == Counter(ok=3, error=1)
    # status is read-only and works without --manifest too
    code, stdout2, _ = main_run(capfd, "status", str(out))
    assert code == 0 and lines(stdout2)[0] == got[0] and len(lines(stdout2)) == 3


def test_status_counts_transient_error_rows_as_pending_like_the_next_run(gateway, tmp_path,
                                                                          capfd):
    rows = url_rows(2) + [{"id": "busy", "image": img("s500", fail=99)}]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    assert main_run(capfd, "caption", str(manifest), "--out", str(out), "--base-url",
                    gateway.base_url, "--retries", "0", *FAST)[0] == 1
    code, stdout, err = main_run(capfd, "status", str(out), "--manifest", str(manifest))
    assert code == 0, err
    got = lines(stdout)
    assert got[0].endswith("1 transient, captioned again by the next run")
    assert got[1] == f"{manifest}: 3 rows x 1 prompt(s), 1 pending"


# --------------------------------------------------------------------------- cost


def test_cost_per_row_from_price_flags_and_total_in_summary(gateway, tmp_path, capfd):
    manifest = write_manifest(tmp_path / "m.csv", url_rows(3))
    code, stdout, err = main_run(capfd, "caption", str(manifest), "--out",
                                 str(tmp_path / "out"), "--base-url", gateway.base_url,
                                 "--price-in", "3", "--price-out", "7", *FAST)
    assert code == 0, err
    df = read_out(tmp_path / "out")
    per_row = (OK_IN * 3 + OK_OUT * 7) / 1e6          # 0.003035
    assert [clean(v) for v in df["prompt_tokens"]] == [OK_IN] * 3
    assert df["cost_usd"].tolist() == pytest.approx([per_row] * 3)
    assert "tokens in/out=3000/15" in stdout
    assert "cost=$0.0091" in stdout                   # 3 x 0.003035 = 0.009105


@pytest.mark.parametrize("model,price", [("gpt-4o-mini-2024-07-18", (0.15, 0.6)),
                                         ("claude-3-5-haiku-20241022", (0.8, 4.0)),
                                         ("openrouter/gpt-4o", (2.5, 10.0)),
                                         ("my-local-vlm", None)])
def test_builtin_price_for_known_models(gateway, tmp_path, capfd, model, price):
    manifest = write_manifest(tmp_path / "m.csv", url_rows(2))
    code, stdout, err = main_run(capfd, "caption", str(manifest), "--out",
                                 str(tmp_path / "out"), "--base-url", gateway.base_url,
                                 "--model", model, *FAST)
    assert code == 0, err
    df = read_out(tmp_path / "out")
    costs = [clean(v) for v in df["cost_usd"]]
    if price is None:
        assert costs == [None, None]
        assert "cost=" not in stdout
    else:
        assert costs == pytest.approx([(OK_IN * price[0] + OK_OUT * price[1]) / 1e6] * 2)
        assert f"cost=${sum(costs):.4f}" in stdout


def test_copied_identical_image_costs_nothing(gateway, tmp_path, capfd):
    tiny_pngs(tmp_path / "pics", 1)
    manifest = write_manifest(tmp_path / "m.csv", [{"id": "a", "image": "pics/im0.png"},
                                                   {"id": "b", "image": "pics/im0.png"}])
    code, stdout, err = main_run(capfd, "caption", str(manifest), "--out",
                                 str(tmp_path / "out"), "--base-url", gateway.base_url,
                                 "--concurrency", "1", "--price-in", "3", "--price-out", "7",
                                 *FAST)
    assert code == 0, err
    assert gateway.count() == 1                       # the second row was copied
    df = read_out(tmp_path / "out")
    copy = df[df["id"] == "b"].iloc[0]
    assert copy["dedup_of"] == "a" and clean(copy["cost_usd"]) == 0.0
    assert "cost=$0.0030 " in stdout
    report = reports(tmp_path / "out")[0]
    assert report["cost_usd"] == pytest.approx((OK_IN * 3 + OK_OUT * 7) / 1e6)
    assert report["tokens_in"] == OK_IN


# --------------------------------------------------------------------------- budget


def _est_cost_per_row(capfd, manifest: Path, *args: str) -> float:
    """The estimate a run reserves for one row, read from --dry-run's table."""
    code, stdout, err = main_run(capfd, "caption", str(manifest), "--out",
                                 str(manifest.parent / "dry-nowhere"), "--base-url",
                                 "http://127.0.0.1:9/v1", "--dry-run", *args)
    assert code == 0, err
    table = [ln.split("\t") for ln in lines(stdout)[1:]]
    ins = {int(r[4]) for r in table}
    outs = {int(r[5]) for r in table}
    assert len(ins) == len(outs) == 1                  # identical rows, identical estimates
    return (ins.pop() * 1.0 + outs.pop() * 1.0) / 1e6   # at 1 USD per million each way


def test_max_cost_stops_with_exit_5_and_a_rerun_finishes_the_rest(gateway, tmp_path, capfd):
    rows = url_rows(8)
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    price = ["--price-in", "1", "--price-out", "1", "--max-tokens", "10"]
    est = _est_cost_per_row(capfd, manifest, *price)
    actual = (OK_IN + OK_OUT) / 1e6
    max_cost = 2 * actual + est + 0.00005               # room for exactly 3 rows
    expected, spent = 0, 0.0                           # the rule: spent + estimate <= max
    while spent + est <= max_cost:
        spent += actual
        expected += 1
    assert expected == 3
    base = ["caption", str(manifest), "--out", str(out), "--base-url", gateway.base_url,
            "--concurrency", "1", *price, *FAST]
    code, stdout, err = main_run(capfd, *base, "--max-cost", f"{max_cost:.6f}")
    assert code == 5, err
    stopped = [ln for ln in lines(err) if ln.startswith("stopped: ")]
    assert len(stopped) == 1 and "budget" in stopped[0], err
    df = read_out(out)
    assert len(df) == expected == gateway.count()
    assert sorted(df["id"]) == [f"r{i:02d}" for i in range(expected)]
    assert df["cost_usd"].sum() == pytest.approx(expected * actual)
    assert df["cost_usd"].sum() <= max_cost
    assert f"ok={expected} failed=0" in stdout
    assert reports(out)[0]["exit_code"] == 5

    first = {c.url for c in gateway.calls()}
    gateway.clear()
    code, stdout, err = main_run(capfd, *base, "--max-cost", "100")
    assert code == 0, err
    assert sorted(c.url for c in gateway.calls()) == sorted({r["image"] for r in rows} - first)
    assert f"ok={8 - expected} failed=0 skipped={expected} (already done)" in stdout
    df = read_out(out)
    assert sorted(df["id"]) == [r["id"] for r in rows]            # one row per key
    assert set(df["status"]) == {"ok"}


def test_max_cost_with_unknown_model_and_no_price_exits_2(gateway, tmp_path, capfd):
    manifest = write_manifest(tmp_path / "m.csv", url_rows(1))
    code, _, err = main_run(capfd, "caption", str(manifest), "--out", str(tmp_path / "out"),
                            "--base-url", gateway.base_url, "--model", "my-local-vlm",
                            "--max-cost", "1", *FAST)
    assert code == 2
    (line,) = lines(err)
    assert line.startswith("error: ") and "--max-cost" in line and "my-local-vlm" in line
    assert "--price-in" in line
    assert gateway.count() == 0
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- dry run


def test_dry_run_prints_pending_rows_with_estimates_and_sends_nothing(gateway, tmp_path,
                                                                     capfd):
    names = tiny_pngs(tmp_path / "pics", 2)
    rows = [{"id": "p0", "image": f"pics/{names[0]}"}, {"id": "p1", "image": f"pics/{names[1]}"},
            {"id": "u0", "image": img("ok", "u0.jpg")}]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    common = ["caption", str(manifest), "--out", str(out), "--base-url", gateway.base_url,
              "--max-tokens", "40", "--price-in", "3", "--price-out", "15",
              *_named({"a": "A?", "b": "Bee, for {id}?"}), *FAST]
    # a fresh OUT: nothing is created
    code, stdout, err = main_run(capfd, *common, "--dry-run")
    assert code == 0, err
    assert not out.exists()
    assert len(lines(stdout)) == 1 + 6
    # after a partial real run, only the pending pairs are listed
    assert main_run(capfd, *common, "--limit", "2")[0] == 0
    assert gateway.count() == 2
    gateway.clear()
    before = snapshot(out)
    code, stdout, err = main_run(capfd, *common, "--dry-run")
    assert code == 0, err
    assert gateway.count() == 0
    assert snapshot(out) == before
    header, *table = [ln.split("\t") for ln in lines(stdout)]
    assert header == ["id", "prompt_name", "image", "sent", "est_input_tokens",
                      "max_output_tokens", "est_cost_usd"]
    assert [(r[0], r[1]) for r in table] == [("p1", "a"), ("p1", "b"), ("u0", "a"), ("u0", "b")]
    assert [r[3] for r in table] == ["17x12", "17x12", "url", "url"]
    for r in table:
        est_in, est_out, cost = int(r[4]), int(r[5]), float(r[6])
        assert est_in > 0 and est_out == 40
        assert cost == pytest.approx((est_in * 3 + est_out * 15) / 1e6, abs=1e-6)
    total_in = sum(int(r[4]) for r in table)
    total_cost = sum((int(r[4]) * 3 + int(r[5]) * 15) / 1e6 for r in table)
    (summary,) = [ln for ln in lines(err) if ln.startswith("dry run: ")]
    assert summary == (f"dry run: 4 rows would be captioned (0 unusable, 0 copied from "
                       f"identical images: left out of the estimate), skipped 2 already "
                       f"done; estimated input tokens {total_in}, output at most 160; "
                       f"cost ${total_cost:.4f} at most")


def test_dry_run_beside_a_running_job_leaves_out_untouched(gateway, tmp_path, capfd):
    manifest = write_manifest(tmp_path / "m.csv", url_rows(2))
    out = tmp_path / "out"
    common = ["caption", str(manifest), "--out", str(out), "--base-url", gateway.base_url,
              *FAST]
    assert main_run(capfd, *common, "--limit", "1")[0] == 0
    # what the sink of a run in progress has on disk while it commits a part
    in_progress = out / ".part-20990101T000000-abcdef-000001.parquet.0123abcd.tmp"
    in_progress.write_bytes(b"PAR1 being written")
    before = snapshot(out)
    code, stdout, err = main_run(capfd, *common, "--dry-run")
    assert code == 0, err
    assert len(lines(stdout)) == 2                 # header + the one pending row
    assert snapshot(out) == before
