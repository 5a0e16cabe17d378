"""The simulator on its own event loop in a background thread.

For benchmarks and tests that drive a client (in-process or as a subprocess) and then
read what the server saw (``stats``: requests, 429s, admission times).
"""

from __future__ import annotations

import asyncio
import threading

from .app import STATS, SimConfig, SimStats, start


class SimThread:
    def __init__(self, config: SimConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(config,), daemon=True)
        self.thread.start()
        if not self.ready.wait(10) or self.error is not None:
            raise RuntimeError(f"simulator did not start: {self.error!r}")

    def _run(self, config: SimConfig) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.runner, self.port = self.loop.run_until_complete(start(config))
        except BaseException as e:  # reported by __init__
            self.error = e
            self.ready.set()
            return
        self.ready.set()
        self.loop.run_forever()
        self.loop.close()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def stats(self) -> SimStats:
        return self.runner.app[STATS]

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
