"""The one thread that runs a peer's stage computations, commits first.

A peer's model is not shared between threads, so every computation runs on this thread, one at a
time; but a step's commit (summing parts, applying the update, copying the state) must not wait
behind a queue of trainers' forward and backward passes: on a slow peer that queue is long, the
apply would time out and the peer fall behind its stage. So work is ordered by priority (COMMIT
before WORK), then by arrival.
"""

import asyncio
import itertools
import queue
import threading

COMMIT, WORK = 0, 1


class ComputeThread:
    def __init__(self, name: str = "stage-compute"):
        self._queue = queue.PriorityQueue()
        self._order = itertools.count()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, priority: int, fn, *args) -> asyncio.Future:
        """Run fn(*args) on the thread; the returned future (of the running event loop) gets its result."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((priority, next(self._order), fn, args, loop, future))
        return future

    def shutdown(self) -> None:
        """Finish what is queued, then stop the thread."""
        self._queue.put((WORK + 1, next(self._order), None, (), None, None))
        self._thread.join()

    def _serve(self) -> None:
        while True:
            _, _, fn, args, loop, future = self._queue.get()
            if fn is None:
                return
            if future.cancelled():  # its caller gave up before it started
                continue
            try:
                result = fn(*args)
            except BaseException as error:  # noqa: BLE001 - handed to the caller
                loop.call_soon_threadsafe(_settle, future, None, error)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)


def _settle(future: asyncio.Future, result, error) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
