"""The image thread pool: results and errors pass through; a job past its timeout fails
and its thread is replaced; too many hung threads fail new jobs at once; and a thread
stuck in a read never keeps the process alive.

Timeouts run on an injected clock: the test moves it past a deadline and the watchdog
acts, so no assertion depends on how fast the machine is.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import CancelledError

import pytest
from conftest import REPO, subprocess_env

from pipeline.images.pool import DaemonPool, JobTimeout, PoolExhausted

WAIT = 10  # seconds a future may take at most before the test fails (never reached)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def released() -> threading.Event:
    """Set at teardown: every job blocked on it returns, so no thread outlives the test."""
    event = threading.Event()
    yield event
    event.set()


def started_and_blocked(release: threading.Event) -> tuple[threading.Event, object]:
    started = threading.Event()

    def job() -> str:
        started.set()
        release.wait()
        return "late"
    return started, job


def test_results_and_exceptions_pass_through() -> None:
    pool = DaemonPool(2)
    assert pool.submit(sum, [1, 2, 3]).result(WAIT) == 6
    with pytest.raises(ZeroDivisionError):
        pool.submit(lambda: 1 / 0).result(WAIT)
    pool.shutdown()


def test_threads_are_daemon_threads() -> None:
    pool = DaemonPool(1, name="probe")
    assert pool.submit(lambda: threading.current_thread().daemon).result(WAIT) is True
    pool.shutdown()


def test_a_job_past_its_timeout_fails_and_a_new_thread_takes_the_next(released) -> None:
    clock = Clock()
    pool = DaemonPool(1, clock=clock)
    started, job = started_and_blocked(released)
    hung = pool.submit_bounded(5.0, job)
    queued = pool.submit_bounded(5.0, lambda: "next")
    assert started.wait(WAIT)
    clock.t = 4.9
    pool.check_deadlines()
    assert not hung.done() and not queued.done()  # the only thread is busy
    clock.t = 5.0
    pool.check_deadlines()
    with pytest.raises(JobTimeout, match="still running after 5 s"):
        hung.result(WAIT)
    assert queued.result(WAIT) == "next"  # served by the replacement thread
    assert pool.hung == 1
    pool.shutdown(wait=False)


def test_the_timeout_counts_from_the_start_not_from_the_queue(released) -> None:
    clock = Clock()
    pool = DaemonPool(1, clock=clock)
    gate = threading.Event()
    first = pool.submit(gate.wait)
    second = pool.submit_bounded(5.0, lambda: "ran")
    clock.t = 100.0  # long queued behind the first job
    pool.check_deadlines()
    gate.set()
    assert first.result(WAIT) is True and second.result(WAIT) == "ran"
    pool.shutdown()


def test_a_written_off_thread_that_finishes_rejoins_and_its_late_result_is_dropped(
        released) -> None:
    clock = Clock()
    pool = DaemonPool(1, max_hung=1, clock=clock)
    started, job = started_and_blocked(released)
    hung = pool.submit_bounded(1.0, job)
    assert started.wait(WAIT)
    clock.t = 2.0
    pool.check_deadlines()
    with pytest.raises(JobTimeout):
        hung.result(WAIT)
    released.set()  # the hung read returns after all
    for _ in range(1000):  # bounded wait for the thread to come back
        if pool.hung == 0:
            break
        time.sleep(0.01)
    assert pool.hung == 0
    assert pool.submit(lambda: "again").result(WAIT) == "again"
    with pytest.raises(JobTimeout):
        hung.result(0)  # still the timeout: the late "late" is not delivered
    pool.shutdown()


def test_too_many_hung_threads_fail_queued_and_new_jobs_at_once(released) -> None:
    clock = Clock()
    pool = DaemonPool(1, max_hung=2, clock=clock)
    jobs = [started_and_blocked(released) for _ in range(2)]
    futures = []
    for started, job in jobs:
        futures.append(pool.submit_bounded(1.0, job))
        assert started.wait(WAIT)
        clock.t += 2.0
        pool.check_deadlines()
    for f in futures:
        with pytest.raises(JobTimeout):
            f.result(WAIT)
    with pytest.raises(PoolExhausted, match="2 jobs are hung"):
        pool.submit_bounded(1.0, lambda: "never").result(WAIT)
    pool.shutdown(wait=False)


def test_shutdown_cancels_what_is_still_queued(released) -> None:
    pool = DaemonPool(1)
    started, job = started_and_blocked(released)
    pool.submit(job)
    assert started.wait(WAIT)
    queued = pool.submit(lambda: "never")
    pool.shutdown(wait=False, cancel_futures=True)
    with pytest.raises(CancelledError):
        queued.result(WAIT)
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None)


STUCK = """
import os, sys, threading
from {module} import {cls}
pool = {cls}(1)
started = threading.Event()
def stuck():
    started.set()
    os.read(os.pipe()[0], 1)  # never returns: nothing is ever written
pool.submit(stuck)
started.wait()
print("exiting", flush=True)
"""


def exits_within(code: str, seconds: float) -> bool:
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(),
                              capture_output=True, timeout=seconds)
    except subprocess.TimeoutExpired:
        return False
    assert proc.stdout == b"exiting\n", proc.stderr
    return True


def test_a_thread_stuck_in_a_read_does_not_keep_the_process_alive() -> None:
    assert exits_within(STUCK.format(module="pipeline.images.pool", cls="DaemonPool"), 20)


@pytest.mark.slow
def test_the_standard_thread_pool_would_keep_it_alive() -> None:
    """Why the pool exists: ThreadPoolExecutor joins its threads at interpreter exit.
    The window opens once the script's last line ran, where a free process is gone in
    milliseconds."""
    code = STUCK.format(module="concurrent.futures", cls="ThreadPoolExecutor")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"exiting\n"
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1)
    finally:
        proc.kill()
        proc.wait()
