"""The watcher thread behind --follow-refresh and the A/B experiment file survives a failing
check and stops when told."""

from __future__ import annotations

import threading
import time

from serving.polling import poll_in_thread


def test_a_failing_check_does_not_end_the_watcher_and_stop_ends_it() -> None:
    calls: list[float] = []

    def check() -> None:
        calls.append(time.monotonic())
        if len(calls) <= 2:
            raise RuntimeError("the file is half written")

    stop = threading.Event()
    thread = poll_in_thread(check, 0.01, stop, "test-poll", "test file")
    deadline = time.monotonic() + 10
    while len(calls) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(calls) >= 5  # it went on after two failures
    assert thread.daemon and thread.name == "test-poll"
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()
    n = len(calls)
    time.sleep(0.05)
    assert len(calls) == n  # nothing after stop
