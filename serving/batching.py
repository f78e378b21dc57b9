"""A micro-batcher: concurrent callers' work items are run together by one worker thread.

The engine puts the user-tower forward and the vector search of concurrent requests
through one :class:`Batcher`: one ONNX call and one matrix product (or one batched
index query) serve up to ``max_batch`` requests.  A caller waits at most ``max_wait_s``
for company, and only while ``coming()`` says more work is on its way (requests that
entered the service but have not reached the batcher yet), so a lone request does not
wait at all.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

W = TypeVar("W")  # a work item
R = TypeVar("R")  # its result


class Batcher(Generic[W, R]):
    """Runs ``fn(items) -> results`` (one result, or an exception, per item) on batches.

    ``fn`` may return an exception instance in place of a result: it is raised in that
    caller only.  An exception raised by ``fn`` itself goes to every caller of the batch.
    """

    def __init__(
        self,
        fn: Callable[[Sequence[W]], Sequence[R | BaseException]],
        max_batch: int = 16,
        max_wait_s: float = 0.0005,
        name: str = "ecomrec-batcher",
        coming: Callable[[], int] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.fn = fn
        self.coming = coming
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._q: queue.SimpleQueue[tuple[W, Future[R]] | None] = queue.SimpleQueue()
        self._idle = threading.Event()  # set while the worker waits for work
        self._idle.set()
        self._inline = threading.Lock()  # one inline call at a time (others queue up)
        self.batches = 0
        self.items = 0
        self.inline = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: W) -> Future[R]:
        fut: Future[R] = Future()
        self._q.put((item, fut))
        return fut

    def run(self, item: W, timeout_s: float | None = None) -> R:
        """``item``'s result (``TimeoutError`` after ``timeout_s``).

        A lone item (no batch running, nothing queued, nothing ``coming``) runs in the
        caller's thread: no hand-over to the worker and back, which on a busy machine costs
        two thread wake-ups.
        """
        if (
            self.coming is not None
            and self._idle.is_set()
            and self._q.empty()
            and self.coming() <= 0
            and self._inline.acquire(blocking=False)
        ):
            try:
                r = self.fn([item])[0]
            finally:
                self._inline.release()
            self.inline += 1
            if isinstance(r, BaseException):
                raise r
            return r
        return self.submit(item).result(timeout_s)

    def _run(self) -> None:
        while True:
            self._idle.set()
            first = self._q.get()
            self._idle.clear()
            if first is None:
                return
            work = [first]
            deadline = time.monotonic() + self.max_wait_s
            stop = False
            while len(work) < self.max_batch:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    left = deadline - time.monotonic()
                    if left <= 0 or (self.coming is not None and self.coming() <= 0):
                        break
                    try:
                        nxt = self._q.get(timeout=left)
                    except queue.Empty:
                        break
                if nxt is None:
                    stop = True
                    break
                work.append(nxt)
            try:
                results = self.fn([w for w, _ in work])
                for (_, fut), r in zip(work, results, strict=True):
                    if isinstance(r, BaseException):
                        fut.set_exception(r)
                    else:
                        fut.set_result(r)
            except BaseException as e:  # hand the failure to every waiting caller
                for _, fut in work:
                    if not fut.done():
                        fut.set_exception(e)
            self.batches += 1
            self.items += len(work)
            if stop:
                return

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=2)
