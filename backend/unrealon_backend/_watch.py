"""
Watching the calls a worker has in flight (PROTOCOL.md section 9.3): keep
their entries claimed (XCLAIM ... JUSTID every second, so no other worker
takes them for a lost worker's), and tell their handlers of a cancel, from
the Pub/Sub channel C{unrealon:backend:cancel} or, should a message be lost
while reconnecting, from the cancel keys and the deadlines checked every
second.

Private to the package: L{unrealon_backend.worker.Worker} runs both loops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from unrealon_backend._dispatch import CANCEL_KEY_PREFIX, InFlight
from unrealon_backend._streams import REDIS_DOWN, Backoff, RedisClient

log = logging.getLogger("unrealon_backend.worker")

CANCEL_CHANNEL = "unrealon:backend:cancel"


class CallWatcher:
    """The refresh loop and the cancel loop of one worker."""

    def __init__(self, client: RedisClient, in_flight: InFlight, *, stream: str, group: str,
                 worker_id: str, now_ms: Callable[[], float]) -> None:
        self.redis = client
        self.in_flight = in_flight
        self.stream = stream
        self.group = group
        self.worker_id = worker_id
        self.now_ms = now_ms

    async def refresh_loop(self, interval: float) -> None:
        """
        Every C{interval} seconds: reset the idle time of the entries being
        handled, and cancel the calls whose cancel key exists or whose
        deadline has passed.
        """
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except REDIS_DOWN as e:
                log.warning("worker %s: could not refresh %d in-flight entries (%s)",
                            self.worker_id, len(self.in_flight.entries), e)

    async def refresh(self) -> None:
        entry_ids = list(self.in_flight.entries)
        if not entry_ids:
            return
        calls = [call for call in self.in_flight.entries.values() if call is not None]
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xclaim(self.stream, self.group, self.worker_id, 0, entry_ids, justid=True)
            for call in calls:
                pipe.get(CANCEL_KEY_PREFIX + call.call_id)
            replies: list[Any] = await pipe.execute()
        still_ours = set(replies[0])
        for entry_id, running in list(self.in_flight.entries.items()):
            if running is not None and entry_id in entry_ids and entry_id not in still_ours:
                # not pending any more: another worker took it over and acknowledged it
                log.warning("worker %s: entry %s (call %s) was acknowledged elsewhere: dropping "
                            "the call", self.worker_id, entry_id, running.call_id)
                running.cancel("lost")
        now = self.now_ms()
        for call, reason in zip(calls, replies[1:]):
            if reason is not None:
                self._tell(call.call_id, str(reason) or "cancelled")  # client, disconnect...
            elif now >= call.deadline:
                self._tell(call.call_id, "deadline")

    async def cancel_loop(self) -> None:
        """Pub/Sub on the cancel channel: a call id in flight here is cancelled."""
        backoff = Backoff()
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CANCEL_CHANNEL)
                backoff.reset()
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        await self._published(str(message["data"]))
            except REDIS_DOWN as e:
                delay = backoff.next_delay()
                log.warning("worker %s: cancel subscription lost, Redis unavailable (%s): "
                            "subscribing again in %.1f s (cancel keys are checked meanwhile)",
                            self.worker_id, e, delay)
                await asyncio.sleep(delay)
            finally:
                await _close_pubsub(pubsub, self.worker_id)

    async def _published(self, call_id: str) -> None:
        """A cancel published for C{call_id}: its reason is the value of its key."""
        if call_id not in self.in_flight.calls:
            return  # another worker's call
        try:
            reason = await self.redis.get(CANCEL_KEY_PREFIX + call_id)
        except REDIS_DOWN as e:
            log.debug("worker %s: reading the cancel reason of %s: %s", self.worker_id, call_id, e)
            reason = None
        self._tell(call_id, str(reason) if reason else "cancelled")

    def _tell(self, call_id: str, reason: str) -> None:
        call = self.in_flight.calls.get(call_id)
        if call is not None and not call.cancelled:
            log.info("worker %s: call %s (%s) cancelled (%s)", self.worker_id, call_id,
                     call.method, reason)
            call.cancel(reason)


async def _close_pubsub(pubsub: Any, worker_id: str) -> None:
    # redis-py renamed PubSub.close to aclose in 5.0.1; 4.5 has only close
    closer = getattr(pubsub, "aclose", None) or pubsub.close
    try:
        await closer()
    except REDIS_DOWN as e:
        log.debug("worker %s: closing the cancel subscription: %s", worker_id, e)
