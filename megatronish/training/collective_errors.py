"""Errors that say which collective of which iteration failed when a peer rank hangs or dies.

torch's own message ("Timed out waiting 600000ms for recv operation to complete", "Connection
closed by peer") names neither the step nor the iteration. Wrapping the steps of an iteration
in `named_collective(...)` turns such an error into a CollectiveError like

    timed out in all-reduce of gradients over data-parallel ranks at iteration 7 (a peer rank is
    hung or dead; the limit is --distributed-timeout-minutes) ...

Nested uses add context: the innermost names the collective, the outer ones where it ran.
(With NCCL, torch's watchdog may instead abort the process after the timeout; its log line names
the operation.)
"""

import contextlib

_TIMEOUT_MARKERS = ("timed out", "timeout")
_PEER_LOST_MARKERS = ("connection closed", "connection reset", "broken pipe", "connection refused", "peer exited")


class CollectiveError(RuntimeError):
    def __init__(self, kind: str, collective: str, cause: BaseException):
        self.kind, self.collective, self.context, self.cause = kind, collective, [], cause
        super().__init__(self._message())

    def _message(self) -> str:
        where = " ".join([self.collective] + self.context)
        hint = ("a peer rank is hung or dead; the limit is --distributed-timeout-minutes" if self.kind == "timed out"
                else "a peer rank died; see its log for the first error")
        return f"{self.kind} in {where} ({hint}): {type(self.cause).__name__}: {self.cause}"

    def add_context(self, context: str) -> None:
        self.context.append(context)
        self.args = (self._message(),)


def _kind(error: BaseException) -> str | None:
    text = str(error).lower()
    if any(marker in text for marker in _TIMEOUT_MARKERS):
        return "timed out"
    if any(marker in text for marker in _PEER_LOST_MARKERS):
        return "failed"
    return None


@contextlib.contextmanager
def named_collective(what: str):
    """Re-raise a timed-out or broken collective inside the block as a CollectiveError naming `what`;
    any other error passes through untouched."""
    try:
        yield
    except CollectiveError as error:
        error.add_context(what)
        raise
    except RuntimeError as error:
        kind = _kind(error)
        if kind is None:
            raise
        raise CollectiveError(kind, what, error) from error
