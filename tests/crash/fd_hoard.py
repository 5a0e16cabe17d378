"""Test harness: ``caption`` in this process while a leak elsewhere takes every free file
descriptor for a while (tests/crash/test_output_faults.py).

    python fd_hoard.py MARKS.json OUT caption-args...

Once the first part is committed in OUT, a thread opens /dev/null until the process
has no descriptor left and holds them until the run noticed a failed write (its debug
record "output failed"), at most $HOARD_SECONDS, then gives them back. That moment is
written to MARKS.json, on the system-wide monotonic clock the test's gateway also uses.

The descriptor limit (soft and hard) is lowered to 512 first: the run raises its soft
limit to the hard one, and on a machine whose hard limit is a million, opening every
free descriptor would take longer than the run itself.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import threading
import time
from pathlib import Path

marks_path, out = Path(sys.argv[1]), Path(sys.argv[2])
marks: dict[str, float] = {}
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
_LIMIT = min(_soft, _hard, 512)
resource.setrlimit(resource.RLIMIT_NOFILE, (_LIMIT, _LIMIT))
noticed = threading.Event()


def hoard() -> None:
    while not any(out.glob("part-*.parquet")):
        time.sleep(0.005)
    fds = []
    marks["hoard_start"] = time.monotonic()
    try:
        while True:
            fds.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    noticed.wait(float(os.environ.get("HOARD_SECONDS", "20")))
    for fd in fds:
        os.close(fd)
    marks["hoard_end"] = time.monotonic()


class Mark(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if "output failed" in record.getMessage() and "failed_at" not in marks:
            marks["failed_at"] = time.monotonic()
            noticed.set()


log = logging.getLogger("pipeline")
log.addHandler(Mark(logging.DEBUG))
shown = logging.StreamHandler(sys.stderr)  # what the CLI would show: warnings and up
shown.setLevel(logging.WARNING)
shown.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
log.addHandler(shown)
log.setLevel(logging.DEBUG)
log.propagate = False
threading.Thread(target=hoard, daemon=True).start()
from pipeline.cli import main  # noqa: E402

# -v: the run's debug records reach the handlers above (and, with propagate off, no more).
code = main(["caption", *sys.argv[3:], "-v"])
marks_path.write_text(json.dumps(marks))
sys.exit(code)
