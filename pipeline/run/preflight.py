"""Checks made before the first request, so a run that cannot finish never starts.

* OUT can be created and written: a probe file is created, written, fsynced, renamed
  and removed, the way every part is committed (``--out`` naming a file, a read-only
  folder, a missing parent without permission: exit 2 with one line).
* The descriptor limit fits ``--concurrency``: each request holds a socket, and the
  image threads, the journal, parts and the event loop need more. The soft limit is
  raised towards the hard one; if even that is too low, the concurrency is lowered
  with one warning line (rather than every request failing with EMFILE).
* Free space: one warning line when it looks too small for the rows ahead.
* A reserve file (``OUT/.reserve``) is kept while the run works and removed the moment
  a write fails, so a full disk still leaves room for the run report and the rows
  in memory.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
from pathlib import Path

from ..errors import RunFatal
from ..store.outdir import TMP_SUFFIX, fsync_dir

__all__ = ["check_output", "fit_descriptors", "warn_if_low_space", "Reserve"]

log = logging.getLogger("pipeline")

FDS_RESERVED = 64          # descriptors besides one socket per request
BYTES_PER_ROW = 4096       # a row in the journal plus its share of a part, generously
RESERVE_BYTES = 256 * 1024


def _bad_out(out: Path, problem: str) -> RunFatal:
    return RunFatal(f"--out {out}: {problem}", "output", exit_code=2)


def check_output(out: Path) -> None:
    """Create OUT if needed and prove a part could be committed there (exit 2 if not)."""
    if out.exists() and not out.is_dir():
        raise _bad_out(out, "exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _bad_out(out, f"cannot be created ({e.strerror or e})") from None
    probe = out / f".probe-{os.getpid()}{TMP_SUFFIX}"
    done = out / f".probe-{os.getpid()}.done{TMP_SUFFIX}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"probe")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(probe, done)
        fsync_dir(out)
        os.unlink(done)
    except OSError as e:
        for p in (probe, done):
            try:
                p.unlink(missing_ok=True)
            except OSError:
                pass
        raise _bad_out(out, f"is not writable ({e.strerror or e})") from None


def fit_descriptors(concurrency: int) -> int:
    """The concurrency the descriptor limit allows (raising the soft limit if it can)."""
    need = concurrency + FDS_RESERVED
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= need:
        return concurrency
    allowed = max(1, soft - FDS_RESERVED)
    log.warning("the open-file limit is %d (ulimit -n), too low for --concurrency %d; "
                "using --concurrency %d (raise the limit to go faster)", soft, concurrency,
                allowed)
    return allowed


def warn_if_low_space(out: Path, rows: int) -> None:
    try:
        free = shutil.disk_usage(out).free
    except OSError:
        return
    need = max(rows, 1) * BYTES_PER_ROW + 4 * RESERVE_BYTES
    if free < need:
        log.warning("only %.1f MB free at %s; %d rows may need about %.1f MB (the run "
                    "stops with exit 6 if the disk fills, and resumes after)", free / 1e6,
                    out, rows, need / 1e6)


class Reserve:
    """Space set aside in OUT, released the moment a write fails."""

    def __init__(self, out: Path, size: int = RESERVE_BYTES) -> None:
        self.path = out / ".reserve"
        try:
            with open(self.path, "wb") as f:
                f.write(b"\0" * size)
        except OSError:  # no room even for this: the checks above already warned
            self.path.unlink(missing_ok=True)

    def release(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
