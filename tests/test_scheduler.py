"""Model work by priority: questions first, bounded queues that answer `busy`, refreshes coalesced per stream."""
from __future__ import annotations

import threading

import pytest

from vidmem.agents.scheduler import BusyError, Priority, Scheduler


def _blocked(scheduler: Scheduler) -> threading.Event:
    """Occupy the worker until the returned event is set (a long prefill, say)."""
    release, started = threading.Event(), threading.Event()
    scheduler.submit(Priority.CAPTION, lambda: (started.set(), release.wait(30)))
    assert started.wait(10)
    return release


def test_a_question_overtakes_queued_refreshes_verification_and_captions():
    scheduler = Scheduler()
    ran: list[str] = []
    release = _blocked(scheduler)
    futures = [scheduler.submit(priority, lambda name=name: ran.append(name))
               for name, priority in (("caption", Priority.CAPTION), ("refresh", Priority.REFRESH),
                                      ("verify", Priority.VERIFY), ("question", Priority.INTERACTIVE))]
    release.set()
    for future in futures:
        future.result(10)
    assert ran == ["question", "verify", "refresh", "caption"]
    scheduler.close()


def test_a_full_queue_refuses_with_busy_and_the_rest_still_run():
    scheduler = Scheduler({Priority.INTERACTIVE: 2})
    release = _blocked(scheduler)
    first = [scheduler.submit(Priority.INTERACTIVE, lambda i=i: i) for i in range(2)]
    with pytest.raises(BusyError) as refused:
        scheduler.submit(Priority.INTERACTIVE, lambda: "third")
    assert refused.value.code == "busy" and "busy" in str(refused.value)
    other = scheduler.submit(Priority.VERIFY, lambda: "other queues are separate")  # not refused
    release.set()
    assert [f.result(10) for f in first] == [0, 1]
    assert other.result(10) == "other queues are separate"
    assert scheduler.refused[Priority.INTERACTIVE] == 1
    scheduler.close()


def test_refreshes_of_one_stream_are_coalesced_into_one_batch():
    scheduler = Scheduler()
    runs: list[str] = []
    release = _blocked(scheduler)
    cam = [scheduler.submit(Priority.REFRESH, lambda: runs.append("cam"), key=("refresh", "cam")) for _ in range(5)]
    door = scheduler.submit(Priority.REFRESH, lambda: runs.append("door"), key=("refresh", "door"))
    assert len({id(f) for f in cam}) == 1 and scheduler.coalesced == 4
    release.set()
    door.result(10)
    cam[0].result(10)
    assert runs == ["cam", "door"]  # one refresh per stream, in turn
    again = scheduler.submit(Priority.REFRESH, lambda: runs.append("cam"), key=("refresh", "cam"))
    again.result(10)  # once run, the next segment queues a new one
    assert runs == ["cam", "door", "cam"]
    scheduler.close()


def test_a_failing_job_reports_its_error_and_the_worker_carries_on():
    scheduler = Scheduler()

    def broken() -> None:
        raise ValueError("model failed")

    with pytest.raises(ValueError, match="model failed"):
        scheduler.submit(Priority.INTERACTIVE, broken).result(10)
    assert scheduler.run(Priority.INTERACTIVE, lambda: 42) == 42
    scheduler.close()
    with pytest.raises(Exception, match="shutting down"):
        scheduler.submit(Priority.INTERACTIVE, lambda: 1)
