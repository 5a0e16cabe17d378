"""A thread pool that never holds the process open, and writes off hung jobs.

``concurrent.futures.ThreadPoolExecutor`` joins its threads at interpreter exit (and
``asyncio.run`` joins the default executor's), so a single thread blocked in ``read()``
on a hung network mount keeps the process alive long past ``--grace``, whatever the
event loop has decided. Here:

* threads are daemon threads: at exit the process ends, whatever a thread is stuck in;
* a job submitted with a timeout that runs longer fails its future with
  ``JobTimeout``; its thread is written off (left to finish or hang on its own) and a
  new thread takes its place, so hung jobs never block the queue behind them;
* at most ``max_hung`` threads are written off at once; past that, queued and new jobs
  fail at once with ``PoolExhausted`` instead of waiting forever for a dead file system.

A job's timeout counts from when a thread starts it, not from when it was queued. A
watchdog thread (started with the first job that has a timeout) checks the deadlines.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from queue import Empty, SimpleQueue
from typing import Any, TypeVar

__all__ = ["DaemonPool", "JobTimeout", "PoolExhausted"]

T = TypeVar("T")


class JobTimeout(Exception):
    """The job ran longer than its timeout; its thread was written off."""


class PoolExhausted(Exception):
    """Too many threads are hung in jobs past their timeout: no job is started."""


class _Job:
    __slots__ = ("future", "fn", "args", "kwargs", "timeout", "deadline")

    def __init__(self, future: Future[Any], fn: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any], timeout: float | None) -> None:
        self.future, self.fn, self.args, self.kwargs = future, fn, args, kwargs
        self.timeout = timeout
        self.deadline: float | None = None


class DaemonPool(Executor):
    def __init__(self, workers: int, name: str = "pool", max_hung: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.workers = max(1, workers)
        self.max_hung = max_hung if max_hung is not None else max(8, 4 * self.workers)
        self.name = name
        self.clock = clock
        self._queue: SimpleQueue[_Job | None] = SimpleQueue()
        self._lock = threading.Lock()
        self._live: set[threading.Thread] = set()      # threads serving the queue
        self._hung: set[threading.Thread] = set()      # written off, still in their job
        self._running: dict[threading.Thread, _Job] = {}
        self._shutdown = False
        self._watchdog: threading.Thread | None = None
        self._interval = 1.0
        self._wake = threading.Event()
        self._ids = itertools.count(1)

    # -- Executor ---------------------------------------------------------------
    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        return self.submit_bounded(None, fn, *args, **kwargs)

    def submit_bounded(self, timeout: float | None, fn: Callable[..., T], /, *args: Any,
                       **kwargs: Any) -> Future[T]:
        """Like ``submit``; the future fails with ``JobTimeout`` after ``timeout`` s of
        running (None: no limit)."""
        future: Future[T] = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new jobs after shutdown")
            if self._exhausted():
                future.set_exception(self._exhausted_error())
                return future
            self._queue.put(_Job(future, fn, args, kwargs, timeout))
            if len(self._live) < self.workers:
                self._spawn()
            if timeout is not None:
                self._interval = min(self._interval, max(0.01, timeout / 4))
                if self._watchdog is None:
                    self._watchdog = threading.Thread(target=self._watch, daemon=True,
                                                      name=f"{self.name}-watchdog")
                    self._watchdog.start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            live = list(self._live)
        if cancel_futures:
            self._drain(None)
        for _ in live:
            self._queue.put(None)
        self._wake.set()
        if wait:  # never the hung ones: that is the point of this pool
            for t in live:
                t.join()

    @property
    def hung(self) -> int:
        """Threads written off and still inside their job."""
        with self._lock:
            return len(self._hung)

    # -- threads ------------------------------------------------------------------
    def _spawn(self) -> None:  # under the lock
        t = threading.Thread(target=self._serve, daemon=True,
                             name=f"{self.name}-{next(self._ids)}")
        self._live.add(t)
        t.start()

    def _serve(self) -> None:
        me = threading.current_thread()
        while True:
            job = self._queue.get()
            if job is None:
                with self._lock:
                    self._live.discard(me)
                return
            if not job.future.set_running_or_notify_cancel():
                continue
            with self._lock:
                if job.timeout is not None:
                    job.deadline = self.clock() + job.timeout
                self._running[me] = job
            ok, value = self._run(job)
            with self._lock:
                self._running.pop(me, None)
                written_off = me in self._hung
                if written_off:  # its future already failed; maybe rejoin the pool
                    self._hung.discard(me)
                    rejoin = not self._shutdown and len(self._live) < self.workers
                    if rejoin:
                        self._live.add(me)
            if not written_off:
                if ok:
                    job.future.set_result(value)
                else:
                    job.future.set_exception(value)
            elif not rejoin:
                return
            del job, value  # no reference to a finished job's data while idle

    @staticmethod
    def _run(job: _Job) -> tuple[bool, Any]:
        try:
            return True, job.fn(*job.args, **job.kwargs)
        except BaseException as e:  # as concurrent.futures does: the future carries it
            return False, e

    def _watch(self) -> None:
        while True:
            with self._lock:
                if self._shutdown:
                    return
            self.check_deadlines()
            self._wake.wait(self._interval)

    def check_deadlines(self) -> None:
        """Write off every job past its deadline (the watchdog's step)."""
        now = self.clock()
        expired: list[_Job] = []
        with self._lock:
            for thread, job in list(self._running.items()):
                if job.deadline is not None and now >= job.deadline:
                    del self._running[thread]
                    self._live.discard(thread)
                    self._hung.add(thread)
                    expired.append(job)
                    if len(self._hung) < self.max_hung and not self._shutdown:
                        self._spawn()  # a replacement takes the hung thread's place
            exhausted = self._exhausted()
        for job in expired:
            job.future.set_exception(JobTimeout(f"still running after {job.timeout:g} s"))
        if exhausted:
            self._drain(self._exhausted_error())

    def _exhausted(self) -> bool:  # under the lock
        return not self._live and len(self._hung) >= self.max_hung

    def _exhausted_error(self) -> PoolExhausted:
        return PoolExhausted(f"{self.max_hung} jobs are hung past their timeout")

    def _drain(self, error: BaseException | None) -> None:
        """Fail (or, with ``None``, cancel) every job still queued."""
        while True:
            try:
                job = self._queue.get_nowait()
            except Empty:
                return
            if job is None:
                self._queue.put(None)  # a shutdown sentinel stays for its thread
                return
            if error is None:
                job.future.cancel()
            elif job.future.set_running_or_notify_cancel():
                job.future.set_exception(error)
