"""
A backend call as an async iterator of its progress items (PROTOCOL.md
section 9): what ``client.stream(...)`` and the generated ``stream_<name>``
methods return.

    async with client.stream("demo.count", {"to": 5}) as call:
        async for item in call:
            print(item)
    print(call.result)

The call starts at the first ``async for`` step (or ``async with``), not when
the object is made, so a stream never runs unobserved.  Leaving the ``async
with`` block early, ``aclose()``, or cancelling the task that iterates all
cancel the call (the runtime sends ``rpc.cancel``).  An error reply is raised
by the iteration, after the items that came before it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Generic, TypeVar

P = TypeVar("P")
R = TypeVar("R")

#: starts the call with the given progress callback; resolves to the result
Starter = Callable[[Callable[[Any, int], None]], Awaitable[Any]]


class BackendStream(Generic[P, R]):
    """The progress items of one backend call, then its ``result``."""

    def __init__(self, start: Starter) -> None:
        self._start = start
        self._items: deque[tuple[int, Any]] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Future[Any] | None = None
        #: the seq of the last item delivered (0: none yet)
        self.seq = 0

    def _begin(self) -> asyncio.Future[Any]:
        if self._task is None:
            self._task = asyncio.ensure_future(self._start(self._arrived))
            self._task.add_done_callback(lambda _: self._wake.set())
        return self._task

    def _arrived(self, item: Any, seq: int) -> None:
        self._items.append((seq, item))
        self._wake.set()

    def __aiter__(self) -> BackendStream[P, R]:
        return self

    async def __anext__(self) -> P:
        task = self._begin()
        while not self._items and not task.done():
            self._wake.clear()
            try:
                await self._wake.wait()
            except asyncio.CancelledError:
                task.cancel()  # the iterating task was cancelled: so is the call
                raise
        if self._items:
            self.seq, item = self._items.popleft()
            return item  # type: ignore[no-any-return]
        task.result()  # raises the call's error, if any
        raise StopAsyncIteration

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()

    @property
    def result(self) -> R:
        """The call's result, once the iteration has ended (else RuntimeError)."""
        if self._task is None or not self._task.done():
            raise RuntimeError("the call has not finished: iterate the stream first")
        return self._task.result()  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        """Cancel the call if it is still running (the server is told)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    async def __aenter__(self) -> BackendStream[P, R]:
        self._begin()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
