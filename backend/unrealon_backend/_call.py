"""
What a backend method handler sees of one call (PROTOCOL.md section 9.3):
the L{Call} object with the caller's identity, its deadline, the cancel flag
and the progress channel, and the exceptions and markers a handler uses
(L{MethodError}, L{Cancelled}, L{Result}).

The worker (L{unrealon_backend.worker}) makes one L{Call} per entry of the
backend stream; its progress items go out through a L{ProgressSender}, which
keeps them in order whichever thread sends them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from unrealon_backend._schema import validate

__all__ = ["Call", "Cancelled", "MethodError", "Result"]

log = logging.getLogger("unrealon_backend.worker")

#: JSON-RPC's reserved range: a worker's own codes stay outside it (section 9.3)
RESERVED_CODES = range(-32768, -32000 + 1)


class MethodError(Exception):
    """
    An application error a handler raises on purpose; it reaches the browser
    as the JSON-RPC error C{{code, message, data}}.  C{code} must be an
    integer outside -32768..-32000 (those are JSON-RPC's and the server's).
    C{data}, when given, must be JSON-serialisable.
    """

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        if isinstance(code, bool) or not isinstance(code, int):
            raise TypeError(f"MethodError code must be an int, got {type(code).__name__}")
        if code in RESERVED_CODES:
            raise ValueError(
                f"MethodError code {code} is in -32768..-32000, reserved for JSON-RPC and "
                "the server: choose another (e.g. 1000 and up)"
            )
        if not isinstance(message, str):
            raise TypeError("MethodError message must be a string")
        super().__init__(code, message, data)
        self.code = code
        self.message = message
        self.data = data

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class Cancelled(Exception):
    """
    The call was cancelled (by the caller, its connection closing, or its
    deadline passing).  Raised by L{Call.progress} / L{Call.aprogress}, and
    thrown into generator handlers at their next C{yield}.  Once a call is
    cancelled the worker sends no reply for it: the server has already
    answered the caller -32014 (or -32012 for a deadline).
    """


class Result:
    """
    The result of an async generator handler, which cannot C{return} one:
    C{yield Result(value)} as its last item (the generator is closed then).
    Sync generators may use it too, or simply C{return value}.
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"Result({self.value!r})"


class ProgressSender:
    """
    The progress items of one call, appended to its C{reply_to} stream in
    the order they were sent with C{seq} counting from 1, from the event
    loop or from handler threads.  C{append(payload)} appends one reply
    entry (the worker's, with its retries).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, call_id: str, method: str,
                 schema: Mapping[str, Any] | None, replies: bool,
                 append: Callable[[dict[str, Any]], Awaitable[None]],
                 encode: Callable[[Any], str]) -> None:
        self.loop = loop
        self.call_id = call_id
        self.method = method
        self.schema = schema
        self.replies = replies
        self._append = append
        self._encode = encode
        self.seq = 0
        # the last send scheduled: each send waits for it, so sends are appended in order
        self._tail: asyncio.Future[None] | None = None

    def check(self, item: Any) -> None:
        """Refuse, in the handler's own frame, an item the declaration does not allow."""
        if self.schema is None:
            raise RuntimeError(
                f"{self.method} declares no progress (progress=None in @method): "
                "declare a progress schema to send progress items"
            )
        errors = validate(item, self.schema, "progress")
        if errors:
            raise ValueError(f"{self.method}: progress item does not fit its schema: {errors}")
        self._encode(item)  # not JSON: a TypeError/ValueError here, not later in the loop

    def schedule(self, item: Any) -> asyncio.Future[None]:
        """On the loop thread: queue one item behind the ones already sent."""
        previous = self._tail
        self.seq += 1
        payload = {"call_id": self.call_id, "type": "progress", "seq": self.seq, "data": item}

        async def send() -> None:
            if previous is not None:
                await asyncio.shield(previous)
            await self._append(payload)

        task = self.loop.create_task(send())
        self._tail = task
        return task

    async def drain(self) -> None:
        """Wait until every item scheduled so far was appended (before the final reply)."""
        if self._tail is not None:
            try:
                await asyncio.shield(self._tail)
            except Exception:  # the failing send logged it; the final reply still goes out
                log.debug("progress of %s: an item was not appended", self.call_id)


class Call:
    """
    One call of a backend method, as the handler sees it.

    @ivar call_id: unique in the cluster (C{<node_id>/<n>}).
    @ivar method: the method's name.
    @ivar params: the params object (also passed as keyword arguments).
    @ivar user_id: the caller's user (the token's C{sub}), or None.
    @ivar connection_id: C{<node_id>/<connection id>} of the caller.
    @ivar node_id: the node that holds the caller's connection.
    @ivar claims: the declaration's C{pass_claims} that the caller's token has.
    @ivar deadline: epoch milliseconds (Redis' clock) after which the caller
        has been answered -32012 and nothing more is delivered.
    @ivar idempotent: whether the method was declared idempotent.
    @ivar delivery: 1 for a first run; 2 or 3 when the call is run again
        after the worker that had it was lost (idempotent methods only).
    @ivar cancel_reason: None until cancelled; then the node's reason
        (C{client}, C{disconnect}, C{deadline}), or C{deadline}/C{lost}/
        C{shutdown} when the worker decided it itself.
    """

    def __init__(self, payload: Mapping[str, Any], *, delivery: int, clock_offset_ms: float,
                 sender: ProgressSender) -> None:
        self.call_id: str = payload["call_id"]
        self.method: str = payload["method"]
        self.params: dict[str, Any] = dict(payload.get("params") or {})
        self.user_id: str | None = _optional_text(payload.get("user_id"))
        self.connection_id: str | None = _optional_text(payload.get("connection_id"))
        self.node_id: str | None = _optional_text(payload.get("node_id"))
        claims = payload.get("claims")
        self.claims: dict[str, Any] = dict(claims) if isinstance(claims, Mapping) else {}
        self.deadline: int = int(payload["deadline"])
        self.idempotent: bool = bool(payload.get("idempotent", False))
        self.delivery = delivery
        self.cancel_reason: str | None = None
        self._clock_offset_ms = clock_offset_ms
        self._cancelled = threading.Event()
        self._sender = sender

    def __repr__(self) -> str:
        return f"<Call {self.method} {self.call_id} user={self.user_id}>"

    @property
    def cancelled(self) -> bool:
        """True once the call was cancelled: stop soon, whatever you return is dropped."""
        return self._cancelled.is_set()

    def cancel(self, reason: str) -> None:
        """Mark the call cancelled (the worker does this; thread-safe, idempotent)."""
        if not self._cancelled.is_set():
            self.cancel_reason = reason
            self._cancelled.set()

    def time_left(self) -> float:
        """Seconds until the deadline (by Redis' clock, as far as this worker knows it)."""
        now_ms = time.time() * 1000 + self._clock_offset_ms
        return max(0.0, (self.deadline - now_ms) / 1000)

    def progress(self, item: Any) -> None:
        """
        Send one progress item to the caller (the method must declare a
        C{progress} schema, which the item must fit).  From a sync handler
        (a worker thread) it returns once the item was appended; from
        coroutine code on the worker's loop it queues the item (still in
        order) and returns at once; use L{aprogress} there to wait.  Raises
        L{Cancelled} if the call was cancelled.
        """
        self._raise_if_cancelled()
        self._sender.check(item)
        if not self._sender.replies:
            return  # a notification: nobody to tell
        if _on_loop(self._sender.loop):
            self._sender.schedule(item)
            return
        future = asyncio.run_coroutine_threadsafe(self._scheduled(item), self._sender.loop)
        future.result()
        self._raise_if_cancelled()

    async def aprogress(self, item: Any) -> None:
        """L{progress} for coroutine handlers: returns once the item was appended."""
        self._raise_if_cancelled()
        self._sender.check(item)
        if self._sender.replies:
            await self._scheduled(item)
        self._raise_if_cancelled()

    async def _scheduled(self, item: Any) -> None:
        await self._sender.schedule(item)

    def _raise_if_cancelled(self) -> None:
        if self._cancelled.is_set():
            raise Cancelled(f"call {self.call_id} was cancelled ({self.cancel_reason})")


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:  # no loop in this thread: a handler thread
        return False


def _optional_text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def encode_json(value: Any, default: Callable[[Any], Any] | None = None) -> str:
    """Compact JSON, no NaN/Infinity (JSON has none): the wire format of every entry."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                      default=default)
