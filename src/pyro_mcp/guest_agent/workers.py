"""A pool of reusable threads: starting a thread costs ~1.5 ms under software emulation,
more than a whole ping round trip, so each call reuses an idle worker when there is one
and starts a new thread only when all are busy (calls never wait for each other)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

MAX_IDLE = 8


class Workers:
    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            reuse = self._idle > 0
            if reuse:
                self._idle -= 1  # that worker is now reserved for this job
        if not reuse:
            threading.Thread(target=self._work, daemon=True).start()
        self._jobs.put(job)

    def _work(self) -> None:
        while True:
            self._jobs.get()()
            with self._lock:
                if self._idle >= MAX_IDLE:
                    return
                self._idle += 1
