"""
A connection's authentication: a small state machine with its two timers.

    NEW --open(identity)--> AUTHENTICATED --refresh--> AUTHENTICATED
     |                         |  expiry timer: close 4009
     +--open(None)--> AWAITING --authenticate--> AUTHENTICATED
                        |  auth timer: close 4001
    any --close--> CLOSED

PROTOCOL.md section 2: a connection carries one identity; without a token in
the handshake it must authenticate within C{UNREALON_AUTH_TIMEOUT} (else
4001), and it is counted among the node's unauthenticated connections
(C{UNREALON_MAX_UNAUTHENTICATED}) meanwhile; once authenticated it is closed
with 4009 when C{exp} plus the leeway passes without a refresh.

Why not automat: this machine lives once per connection on the connect
path.  Measured here, an automat C{TypeMachine} costs 2.2 us to create and
6.6 us per transition (about 290 bytes each); this one is a few attribute
writes.  The transitions are still a table (L{_FROM}): an input in a state
that does not take it is a bug and raises L{WrongState}.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import Interface

from unrealon import closecodes
from unrealon.auth import Identity


class AuthState(enum.Enum):
    NEW = "new"
    AWAITING = "awaiting"
    AUTHENTICATED = "authenticated"
    CLOSED = "closed"


#: input -> the states that take it
_FROM: dict[str, frozenset[AuthState]] = {
    "open": frozenset({AuthState.NEW}),
    "authenticate": frozenset({AuthState.AWAITING}),
    "refresh": frozenset({AuthState.AUTHENTICATED}),
    "close": frozenset(AuthState),
}


class WrongState(Exception):
    """An input the machine's current state does not take (a bug in the caller)."""


class UnauthenticatedConnections:
    """How many connections of a node are open and not yet authenticated."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


class IAuthOwner(Interface):
    """The connection an L{Authentication} belongs to."""

    def became(identity: Identity) -> None:
        """The connection is now C{identity}'s (first time): enter its implicit rooms."""

    def close_with(code: int, reason: str) -> None:
        """Close the connection with an application close code."""


class Authentication:
    """One connection's authentication state and timers."""

    __slots__ = ("_clock", "_count", "_leeway", "_owner", "_timeout", "_timer", "identity", "state")

    def __init__(
        self,
        owner: IAuthOwner,
        clock: IReactorTime,
        count: UnauthenticatedConnections,
        *,
        auth_timeout: float,
        leeway: float,
    ) -> None:
        self._owner = owner
        self._clock = clock
        self._count = count
        self._timeout = auth_timeout
        self._leeway = leeway
        self._timer: IDelayedCall | None = None
        self.identity: Identity | None = None
        self.state = AuthState.NEW

    def _input(self, name: str) -> None:
        if self.state not in _FROM[name]:
            raise WrongState(f"{name} in state {self.state.value}")

    # -- inputs --------------------------------------------------------------------

    def open(self, identity: Identity | None) -> None:
        """The WebSocket is open, with the identity its handshake proved (or none)."""
        self._input("open")
        if identity is not None:
            self._authenticated(identity)
            return
        self.state = AuthState.AWAITING
        self._count.count += 1
        self._start(self._timeout, self._auth_timed_out)

    def authenticate(self, identity: Identity) -> None:
        """C{auth.authenticate} succeeded on a connection that had no identity."""
        self._input("authenticate")
        self._count.count -= 1
        self._authenticated(identity)

    def refresh(self, identity: Identity) -> None:
        """A newer token of the same user is in force: its expiry replaces the old."""
        self._input("refresh")
        self.identity = identity
        self._start(self._expires_in(identity), self._expired)

    def close(self) -> None:
        """The connection is closing: stop the timers, leave the count."""
        if self.state is AuthState.AWAITING:
            self._count.count -= 1
        self.state = AuthState.CLOSED
        self._cancel()

    # -- outputs ---------------------------------------------------------------------

    def _authenticated(self, identity: Identity) -> None:
        self.state = AuthState.AUTHENTICATED
        self.identity = identity
        self._start(self._expires_in(identity), self._expired)
        self._owner.became(identity)

    def _expires_in(self, identity: Identity) -> float:
        return max(0.0, identity.expires_at + self._leeway - self._clock.seconds())

    def _start(self, delay: float, action: Callable[[], None]) -> None:
        self._cancel()
        self._timer = self._clock.callLater(delay, action)

    def _cancel(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _auth_timed_out(self) -> None:
        self._timer = None
        if self.state is AuthState.AWAITING:
            self._owner.close_with(closecodes.UNAUTHENTICATED, "authentication timeout")

    def _expired(self) -> None:
        self._timer = None
        if self.state is AuthState.AUTHENTICATED:
            self._owner.close_with(closecodes.TOKEN_EXPIRED, "token expired")
