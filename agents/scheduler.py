"""Model work in order of what a person is waiting for, instead of one lock in arrival order.

One deployment has one model and so one `Scheduler`: a worker thread takes jobs by priority (a question someone
is waiting on, then a rule's verification, then a live window's refresh, then captions), first come first served
within a priority. Each priority has a bounded queue: a job that finds its queue full is refused at once with
`BusyError` (code `busy`), which the websocket and MQTT services pass on, rather than waiting behind work that may
take minutes. Refreshes are coalesced per key (a stream): while one is queued, more segments of that stream ask
for nothing more, because the refresh takes every segment committed before it starts, so a stream whose segments
arrive faster than a refresh takes is refreshed in batches, not per segment, and every stream gets its turn.
"""
from __future__ import annotations

import enum
import itertools
import logging
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Hashable

from vidmem.errors import VidmemError

log = logging.getLogger(__name__)


class Priority(enum.IntEnum):
    """Lower runs first."""

    INTERACTIVE = 0  # a question someone is waiting on (websocket, MQTT, chat)
    VERIFY = 1  # a watch rule's yes/no verification
    REFRESH = 2  # bringing a live stream's kept window up to date
    CAPTION = 3  # describing stored segments


DEFAULT_LIMITS = {Priority.INTERACTIVE: 16, Priority.VERIFY: 64, Priority.REFRESH: 256, Priority.CAPTION: 256}


class BusyError(VidmemError):
    """Model work refused because its queue is full."""

    code = "busy"


@dataclass
class _Job:
    priority: Priority
    order: int
    fn: Callable[[], Any]
    future: Future
    key: Hashable | None


class Scheduler:
    """A priority queue of model work and the one thread that runs it (`start` on first submit, `close` to end)."""

    def __init__(self, limits: dict[Priority, int] | None = None, *, name: str = "vidmem-model") -> None:
        self.limits = {**DEFAULT_LIMITS, **(limits or {})}
        self.name = name
        self._queues: dict[Priority, deque[_Job]] = {p: deque() for p in Priority}
        self._pending: dict[tuple[Priority, Hashable], _Job] = {}  # coalesced jobs waiting, by key
        self._cond = threading.Condition()
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.done = {p: 0 for p in Priority}  # jobs run, per priority
        self.refused = {p: 0 for p in Priority}  # jobs refused as busy, per priority
        self.coalesced = 0  # submissions answered by a job already queued

    def submit(self, priority: Priority, fn: Callable[[], Any], *, key: Hashable | None = None) -> Future:
        """Queue `fn()`; its Future. With `key`, a job with the same priority and key still waiting is returned
        instead (coalescing). BusyError when the priority's queue is full, VidmemError once closed."""
        with self._cond:
            if self._closed:
                raise VidmemError("the model is shutting down; try again later")
            if key is not None:
                waiting = self._pending.get((priority, key))
                if waiting is not None:
                    self.coalesced += 1
                    return waiting.future
            queue = self._queues[priority]
            if len(queue) >= self.limits[priority]:
                self.refused[priority] += 1
                raise BusyError(f"the model is busy: {len(queue)} {priority.name.lower()} jobs are waiting; "
                                "try again in a moment")
            job = _Job(priority, next(self._order), fn, Future(), key)
            queue.append(job)
            if key is not None:
                self._pending[(priority, key)] = job
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify()
            return job.future

    def run(self, priority: Priority, fn: Callable[[], Any], *, key: Hashable | None = None) -> Any:
        """Submit and wait for the result (from a thread that is not the scheduler's own)."""
        if threading.current_thread() is self._thread:
            return fn()  # already on the model thread (a job calling model work): run it in place
        return self.submit(priority, fn, key=key).result()

    def waiting(self) -> dict[str, int]:
        with self._cond:
            return {p.name.lower(): len(q) for p, q in self._queues.items()}

    def _next(self) -> _Job | None:
        with self._cond:
            while True:
                for priority in Priority:
                    queue = self._queues[priority]
                    if queue:
                        job = queue.popleft()
                        if job.key is not None:
                            self._pending.pop((priority, job.key), None)
                        return job
                if self._closed:
                    return None
                self._cond.wait()

    def _work(self) -> None:
        while True:
            job = self._next()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                continue
            try:
                job.future.set_result(job.fn())
            except BaseException as exc:  # handed to whoever waits; the worker carries on
                job.future.set_exception(exc)
            self.done[job.priority] += 1

    def close(self, *, cancel: bool = True, timeout: float | None = None) -> None:
        """Refuse new work, cancel what waits (unless `cancel` is False), and wait for the running job."""
        with self._cond:
            self._closed = True
            if cancel:
                for queue in self._queues.values():
                    while queue:
                        queue.popleft().future.cancel()
                self._pending.clear()
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
