"""The first hour: every mistake a new user makes gets one line that names the fix,
and the manifests people actually have (semicolons, tabs, other column names, a pipe
from another program) caption as they are.

Runs go against the scripted loopback gateway (tests/fake_gateway/); standard
input is exercised through a real `cat ... |` pipe into a subprocess.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from conftest import FAST, REPO, subprocess_env, write_manifest
from fake_gateway import LOCAL_CAPTION, img
from test_jobs_and_operations import lines, main_run, tiny_pngs, write_job


def one_line(capfd: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    try:
        code, out, err = main_run(capfd, *argv)
    except SystemExit as e:  # argparse's exit, as `python -m pipeline` would end
        code, (out, err) = int(e.code or 0), capfd.readouterr()
    (line,) = lines(err)
    assert "Traceback" not in err and not out.strip(), (out, err)
    return code, line


# --------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("word,fix", [("captoin", "did you mean 'caption'?"),
                                      ("stats", "did you mean 'status'?"),
                                      ("--out", "options follow the command")])
def test_a_mistyped_command_names_the_closest_one(capfd, word, fix) -> None:
    code, line = one_line(capfd, word, "x.csv")
    assert code == 2 and fix in line, line


@pytest.mark.parametrize("typo,fix", [("--concurency", "--concurrency"),
                                      ("--max-cots", "--max-cost"),
                                      ("--out-dir", "--out")])
def test_a_mistyped_option_names_the_closest_one(capfd, tmp_path, typo, fix) -> None:
    code, line = one_line(capfd, "caption", "m.csv", typo, "4")
    assert code == 2
    assert f"unknown option {typo}; did you mean {fix}?" in line, line


def test_concurrency_above_the_maximum_is_exit_2(capfd, tmp_path) -> None:
    manifest = write_manifest(tmp_path / "m.csv", [{"id": "a", "image": img("ok")}])
    code, line = one_line(capfd, "caption", str(manifest), "--base-url",
                          "http://127.0.0.1:9/v1", "--concurrency", "10000000")
    assert code == 2 and "4096" in line and "--concurrency" in line, line
    assert not (REPO / "out" / "m").exists()


# --------------------------------------------------------------------------- manifest layouts


@pytest.mark.parametrize("sep", [";", "\t", "|"])
def test_a_manifest_separated_by_semicolons_tabs_or_pipes_captions(caption, sep) -> None:
    names = tiny_pngs(caption.tmp / "pics", 2)
    path = caption.tmp / "m.csv"
    path.write_text(f"id{sep}image{sep}split\n" + "".join(
        f"r{i}{sep}pics/{n}{sep}train, part {i}\n" for i, n in enumerate(names)))
    r = caption(path)
    assert r.code == 0, r.stderr
    assert sorted(r.ids) == ["r0", "r1"]
    assert r.row("r1")["caption"] == LOCAL_CAPTION
    assert r.row("r1")["split"] == "train, part 1"        # a comma inside a ';' field


def test_delimiter_option_reads_what_the_header_alone_cannot_tell(caption) -> None:
    # one column in the header: nothing to detect, so --delimiter says it
    tiny_pngs(caption.tmp / "pics", 1)
    path = caption.tmp / "m.csv"
    path.write_text("image\npics/im0.png\n")
    assert caption(path, "--delimiter", "tab").code == 0


def test_a_semicolon_file_read_as_commas_names_the_delimiter_option(capfd, tmp_path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("id;image;split\nr1;a.png;x\n")
    code, line = one_line(capfd, "caption", str(path), "--dry-run", "--delimiter", ",")
    assert code == 2 and "--delimiter ';'" in line, line


def test_an_image_path_column_names_the_image_column_option(capfd, tmp_path) -> None:
    path = write_manifest(tmp_path / "m.csv", [{"id": "1", "image_path": "a.png", "label": "x"}])
    code, line = one_line(capfd, "caption", str(path), "--dry-run")
    assert code == 2
    assert "'image_path' looks like image paths" in line
    assert "--image-column image_path" in line


def test_image_and_id_columns_can_be_named(caption) -> None:
    tiny_pngs(caption.tmp / "pics", 2)
    path = write_manifest(caption.tmp / "m.csv", [{"uid": "u1", "picture": "pics/im0.png",
                                                   "id": "not-the-key"},
                                                  {"uid": "u2", "picture": "pics/im1.png",
                                                   "id": "x"}])
    r = caption(path, "--image-column", "picture", "--id-column", "uid")
    assert r.code == 0, r.stderr
    assert sorted(r.ids) == ["u1", "u2"]
    row = r.row("u1")
    assert row["image"] == "pics/im0.png" and row["manifest_id"] == "not-the-key"


def test_a_mistyped_column_option_names_the_real_column(capfd, tmp_path) -> None:
    path = write_manifest(tmp_path / "m.csv", [{"uid": "1", "picture": "a.png"}])
    code, line = one_line(capfd, "caption", str(path), "--dry-run", "--image-column",
                          "pictures", "--id-column", "uid")
    assert code == 2 and "did you mean --image-column picture?" in line, line


def test_job_files_name_the_columns_too(gateway, tmp_path, capfd) -> None:
    tiny_pngs(tmp_path / "pics", 1)
    (tmp_path / "m.csv").write_text("key;file\nk1;pics/im0.png\n")
    job = write_job(tmp_path / "job.toml", f"""
manifest = "m.csv"
out = "out"
image_column = "file"
id_column = "key"
[api]
base_url = "{gateway.base_url}"
""")
    code, _, err = main_run(capfd, "run", str(job), *FAST)
    assert code == 0, err
    assert gateway.count() == 1


# --------------------------------------------------------------------------- standard input


def _piped(manifest, cwd, *args: str) -> subprocess.CompletedProcess[str]:
    shell = (f"cat {manifest} | {sys.executable} -m pipeline caption "
             + " ".join(args))
    return subprocess.run(shell, shell=True, cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["-", "/dev/stdin"])
def test_a_manifest_piped_into_stdin_captions_and_resumes_by_id(gateway, tmp_path, name):
    names = tiny_pngs(tmp_path / "pics", 3)
    rows = [{"id": f"p{i}", "image": f"pics/{n}"} for i, n in enumerate(names)]
    rows.append({"id": "u", "image": img("ok", "u.jpg")})
    manifest = write_manifest(tmp_path / "elsewhere.csv", rows)
    args = [name, "--out", "OUT", "--base-url", gateway.base_url, *FAST]
    first = _piped(manifest, tmp_path, *args)   # relative paths: from the current folder
    assert first.returncode == 0, first.stderr
    assert "ok=4 failed=0" in first.stdout
    assert gateway.count() == 4
    gateway.clear()
    again = _piped(manifest, tmp_path, *args)
    assert again.returncode == 0, again.stderr
    assert gateway.count() == 0 and "skipped=4 (already done)" in again.stdout


@pytest.mark.slow
def test_a_quiet_pipe_does_not_stop_the_run_from_answering_sigint(gateway, tmp_path):
    """The writer goes quiet after two rows: they are captioned, and SIGINT still
    ends the run at once (the pipe is read off the event loop)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "caption", "-", "--out", str(tmp_path / "OUT"),
         "--base-url", gateway.base_url, *FAST], cwd=tmp_path, env=subprocess_env(),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdin is not None
        proc.stdin.write(f"id,image\na,{img('ok', 'a.jpg')}\nb,{img('ok', 'b.jpg')}\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 30
        while sum(c.outcome == "ok" for c in gateway.calls()) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)   # stdin still open and quiet
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "ok=2 failed=0" in out


def test_stdin_without_out_says_to_pass_out(capfd) -> None:
    code, line = one_line(capfd, "caption", "-", "--base-url", "http://127.0.0.1:9/v1")
    assert code == 2 and "--out" in line, line


# --------------------------------------------------------------------------- dry run


def test_dry_run_needs_no_endpoint_and_leaves_copies_out_of_the_estimate(tmp_path, capfd):
    tiny_pngs(tmp_path / "pics", 2)
    manifest = write_manifest(tmp_path / "m.csv", [
        {"id": "a", "image": "pics/im0.png"}, {"id": "b", "image": "pics/im1.png"},
        {"id": "a2", "image": "pics/im0.png"}])      # the same bytes as a
    code, stdout, err = main_run(capfd, "caption", str(manifest), "--out",
                                 str(tmp_path / "out"), "--dry-run", "--price-in", "1",
                                 "--price-out", "1")
    assert code == 0, err
    header, *table = [ln.split("\t") for ln in lines(stdout)]
    rows = {r[0]: r for r in table}
    assert rows["a2"][3] == "copy (identical image)" and rows["a2"][4:] == ["0", "0", "0"]
    est = sum(int(rows[i][4]) + int(rows[i][5]) for i in ("a", "b"))
    (summary,) = [ln for ln in lines(err) if ln.startswith("dry run: ")]
    assert "(0 unusable, 1 copied from identical images: left out of the estimate)" in summary
    assert f"cost ${est / 1e6:.4f} at most" in summary


def test_dry_run_counts_images_out_already_holds_as_copies(gateway, tmp_path, capfd):
    tiny_pngs(tmp_path / "pics", 1)
    out = tmp_path / "out"
    first = write_manifest(tmp_path / "m1.csv", [{"id": "a", "image": "pics/im0.png"}])
    assert main_run(capfd, "caption", str(first), "--out", str(out), "--base-url",
                    gateway.base_url, *FAST)[0] == 0
    second = write_manifest(tmp_path / "m2.csv", [{"id": "a", "image": "pics/im0.png"},
                                                  {"id": "z", "image": "pics/im0.png"}])
    code, stdout, err = main_run(capfd, "caption", str(second), "--out", str(out), "--dry-run")
    assert code == 0, err
    assert [ln.split("\t")[:4] for ln in lines(stdout)[1:]] == [
        ["z", "default", "pics/im0.png", "copy (identical image)"]]


def test_status_reads_a_manifest_with_named_columns(gateway, tmp_path, capfd) -> None:
    tiny_pngs(tmp_path / "pics", 2)
    (tmp_path / "m.csv").write_text("key;file\nk1;pics/im0.png\nk2;pics/im1.png\n")
    out = str(tmp_path / "out")
    columns = ["--image-column", "file", "--id-column", "key"]
    assert main_run(capfd, "caption", str(tmp_path / "m.csv"), "--out", out, "--base-url",
                    gateway.base_url, "--limit", "1", *columns, *FAST)[0] == 0
    code, stdout, err = main_run(capfd, "status", out, "--manifest", str(tmp_path / "m.csv"),
                                 *columns)
    assert code == 0, err
    assert f"{tmp_path / 'm.csv'}: 2 rows x 1 prompt(s), 1 pending" in stdout
