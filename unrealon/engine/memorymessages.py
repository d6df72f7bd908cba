"""
Streamed messages for the in-memory engine (PROTOCOL.md section 5.1).

The same rules as the Redis engine's scripts (L{unrealon.engine.messagescripts}),
in Python: chunks are delivered in C{seq} order, held back while an earlier
one is missing (released with the gap reported once the wait is over),
ignored when repeated or after C{done}; a message keeps one history entry,
at the position of its latest event, and recovers as one event covering the
deliveries after a cursor.  The conformance tests hold both engines to it.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from typing import Any

import attrs

from unrealon.engine.interfaces import MessageChunk


@attrs.frozen
class Delivery:
    """One event of a message: the first C{seq} it covered, what it added."""

    position: int
    first_seq: int
    content: str


@attrs.define(eq=False)
class StreamedMessage:
    """One streamed message of a room, as far as it got."""

    message_id: str
    event: str
    fields: Mapping[str, Any]
    last_chunk_at: float
    next_seq: int = 0
    done: bool = False
    error: str | None = None
    gaps: list[tuple[int, int]] = attrs.field(factory=list)
    deliveries: list[Delivery] = attrs.field(factory=list)
    #: seq -> chunk, while an earlier one is missing
    held: dict[int, MessageChunk] = attrs.field(factory=dict)
    #: when the held chunks are released (the clock's seconds), if any are held
    due: float | None = None

    @property
    def position(self) -> int:
        """The history position of the message's latest event."""
        return self.deliveries[-1].position

    def accept(self, chunk: MessageChunk, now: float, wait: float) -> list[MessageChunk] | None:
        """
        Take one chunk: the run of chunks to deliver now (it and the held
        ones after it), or None when it is held or ignored.
        """
        seq = chunk.seq
        if self.done or seq < self.next_seq or seq in self.held:
            return None
        if seq > self.next_seq:
            self.held[seq] = chunk
            if self.due is None:
                self.due = now + wait
            return None
        run = [chunk]
        while not run[-1].done and run[-1].seq + 1 in self.held:
            run.append(self.held.pop(run[-1].seq + 1))
        if run[-1].done:
            self.held.clear()
        if not self.held:
            self.due = None
        return run

    def release(self) -> tuple[list[MessageChunk], list[tuple[int, int]]]:
        """Every held chunk, and the missing seqs before them (the wait is over)."""
        run: list[MessageChunk] = []
        gaps: list[tuple[int, int]] = []
        cursor = self.next_seq
        for seq in sorted(self.held):
            if run and run[-1].done:
                break
            if seq > cursor:
                gaps.append((cursor, seq - 1))
            run.append(self.held[seq])
            cursor = seq + 1
        self.held.clear()
        self.due = None
        return run, gaps

    def record(self, position: int, first: int, last: int, content: str, done: bool,
               error: str | None, gaps: list[tuple[int, int]]) -> None:
        self.deliveries.append(Delivery(position, first, content))
        self.next_seq = last + 1
        self.gaps.extend(gaps)
        if done:
            self.done, self.error = True, error
            # recovered whole from now on: one delivery holds all of it
            text = "".join(d.content for d in self.deliveries)
            self.deliveries = [Delivery(position, 0, text)]

    def data(self, after: int | None) -> dict[str, Any]:
        """
        The data of one event covering the deliveries after history position
        C{after} (None: all of them; all of them too once the message is
        done: a finished message is recovered whole).
        """
        index = 0 if after is None or self.done else bisect.bisect_right(
            [d.position for d in self.deliveries], after
        )
        covered = self.deliveries[index:]
        return self.event_data(
            covered[0].first_seq, self.next_seq - 1, "".join(d.content for d in covered),
            self.done, self.error,
        )

    def event_data(self, first: int, last: int, content: str, done: bool,
                   error: str | None) -> dict[str, Any]:
        data = dict(self.fields)
        data.update(content=content, seq=first, last_seq=last, done=done)
        gaps = [[max(a, first), min(b, last)] for a, b in self.gaps if b >= first and a <= last]
        if gaps:
            data["gaps"] = gaps
        if error is not None:
            data["error"] = error
        return data
