"""
Per-connection call rate limiting: a token bucket on an injected clock.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime


class TokenBucket:
    """
    C{rate} tokens per second, holding at most C{burst}.

    L{take} answers 0 when a call may go ahead, else how many seconds until
    one token is back (the client's C{retry_after_ms}).
    """

    def __init__(self, rate: float, burst: float, clock: IReactorTime) -> None:
        self._rate = rate
        self._burst = burst
        self._clock = clock
        self._tokens = burst
        self._updated = clock.seconds()

    def take(self) -> float:
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
