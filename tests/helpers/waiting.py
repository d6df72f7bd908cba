"""
Waiting in tests on the real reactor: for a condition, with a deadline.

L{wait_until} is the one way a test waits for something that happens in
another process or on a socket.  It never proves a negative: "nothing more
arrived" is shown by a positive signal that must come after anything that
could have arrived (a marker event published behind it, an acknowledged
entry that nobody can claim again, a reader seen waiting), or on a
L{twisted.internet.task.Clock}.  L{sleep} paces load generators and polls;
it is not a way to wait for an outcome.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater


def sleep(seconds: float) -> Deferred[None]:
    """A pause on the real reactor."""
    return deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


def wait_until(
    check: Callable[[], Any],
    *,
    timeout: float = 10.0,
    what: str = "",
    interval: float = 0.02,
    stop_if: Callable[[], str | None] | None = None,
) -> Deferred[Any]:
    """
    Call C{check} every C{interval} seconds until it gives a truthy value,
    and fire with that value.  C{check} may return a value, a Deferred or a
    coroutine; an exception it raises counts as "not yet" (and is reported
    if the deadline passes).  Fails with an C{AssertionError} naming C{what}
    after C{timeout} seconds, or at once when C{stop_if} returns a reason
    (e.g. the process under test has exited, with its output).
    """

    async def poll() -> Any:
        deadline = time.monotonic() + timeout
        last_error: BaseException | None = None
        while True:
            try:
                value = check()
                if isinstance(value, Deferred) or inspect.iscoroutine(value):
                    value = await ensureDeferred(value)
                if value:
                    return value
            except Exception as e:
                last_error = e
            reason = stop_if() if stop_if is not None else None
            if reason:
                raise AssertionError(f"gave up waiting for {what or check}: {reason}")
            if time.monotonic() > deadline:
                detail = f" (last error: {last_error!r})" if last_error is not None else ""
                raise AssertionError(f"timed out after {timeout} s waiting for {what or check}{detail}")
            await sleep(interval)

    return Deferred.fromCoroutine(poll())
