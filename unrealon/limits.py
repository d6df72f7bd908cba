"""
Per-connection message rate limiting (PROTOCOL.md section 3), on an injected clock.

Every message a client sends counts, whatever it holds: requests and
notifications (a batch's entries one by one), C{auth.*} calls, and messages
that are not JSON or not valid requests.  L{RateGuard} answers, for each of
them, whether it may be handled, must be refused (with how long until the
next one would pass), or whether the connection has earned a 4029 close:
over the limit for L{ABUSE_SECONDS} consecutive seconds, or more than
L{ABUSE_FACTOR} times the limit within one second.
"""

from __future__ import annotations

import enum

from twisted.internet.interfaces import IReactorTime

#: seconds over the rate limit before 4029
ABUSE_SECONDS = 10.0
#: a connection stays "over the limit" while its refused messages come at
#: most this many seconds apart (or two token periods, for very low limits)
ABUSE_GAP = 1.0
#: more than this many times the limit within one second is closed at once
ABUSE_FACTOR = 10


class TokenBucket:
    """
    C{rate} tokens per second, holding at most C{burst}.

    L{take} answers 0 when a call may go ahead, else how many seconds until
    one token is back (the client's C{retry_after_ms}).
    """

    __slots__ = ("_burst", "_clock", "_rate", "_tokens", "_updated")

    def __init__(self, rate: float, burst: float, clock: IReactorTime) -> None:
        self._rate = rate
        self._burst = burst
        self._clock = clock
        self._tokens = burst
        self._updated = clock.seconds()

    def take(self, now: float | None = None) -> float:
        if now is None:
            now = self._clock.seconds()
        # reactor.seconds() is wall-clock time: when it steps back (NTP), no
        # time has passed, rather than a debt that would lock the client out
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
        self._updated = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self._rate


class Verdict(enum.Enum):
    """What to do with one message."""

    HANDLE = "handle"
    REFUSE = "refuse"
    #: refuse it, and close the connection with 4029
    CLOSE = "close"


class RateGuard:
    """
    One connection's message rate: a token bucket (C{rate} per second, burst
    twice that) plus the two abuse rules.

    L{admit} is called once per message (per batch entry); after a refusal,
    L{retry_after} says how many seconds until a token is back.  "Within one
    second" is a sliding window estimated from two fixed one-second windows
    (the previous window's count weighted by how much of it still overlaps),
    three numbers instead of a timestamp per message.
    """

    __slots__ = (
        "_bucket",
        "_clock",
        "_gap",
        "_last_refused",
        "_limit_in_second",
        "_limited_since",
        "_previous",
        "_window",
        "_window_start",
        "retry_after",
    )

    def __init__(self, rate: float, clock: IReactorTime) -> None:
        self._clock = clock
        # (at least one token: a limit under 0.5/s would otherwise admit nothing)
        self._bucket = TokenBucket(rate, max(1.0, 2 * rate), clock)
        self._gap = max(ABUSE_GAP, 2.0 / rate)
        self._limit_in_second = ABUSE_FACTOR * rate
        self._limited_since: float | None = None
        self._last_refused = 0.0
        self._window_start = clock.seconds()
        self._window = 0
        self._previous = 0
        #: seconds until the next message would pass, after a refusal
        self.retry_after = 0.0

    def admit(self) -> Verdict:
        now = self._clock.seconds()
        elapsed = now - self._window_start
        if elapsed >= 1.0 or elapsed < 0.0:
            # a new window: the one before it only counts if it was the last
            self._previous = self._window if 0.0 <= elapsed < 2.0 else 0
            self._window = 0
            self._window_start = now if elapsed < 0.0 or elapsed >= 2.0 else (
                self._window_start + 1.0
            )
            elapsed = now - self._window_start
        self._window += 1
        in_last_second = self._window + self._previous * (1.0 - elapsed)
        wait = self._bucket.take(now)
        if wait <= 0.0:
            return Verdict.HANDLE
        self.retry_after = wait
        if self._limited_since is None or now - self._last_refused > self._gap:
            self._limited_since = now
        self._last_refused = now
        if in_last_second > self._limit_in_second or now - self._limited_since >= ABUSE_SECONDS:
            return Verdict.CLOSE
        return Verdict.REFUSE

    def retry_after_ms(self) -> int:
        """L{retry_after} as the whole milliseconds a client waits (at least 1)."""
        return max(1, int(self.retry_after * 1000 + 0.999))
