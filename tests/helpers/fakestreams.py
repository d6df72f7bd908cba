"""
An in-memory stand-in for the part of Redis the ingress consumer uses, on a
L{Clock}: one stream with consumer groups, the reply lists, and a switch
that takes Redis away.

L{FakeRedis.execute_command} answers the commands L{unrealon.ingress}
sends (XGROUP CREATE, XREADGROUP with and without BLOCK, XACK, XADD,
XAUTOCLAIM, XPENDING, XINFO GROUPS, XLEN, CLIENT ID/UNBLOCK, and the reply
script) with the reply shapes Redis gives, so the consumer's state machine
(taking back its own entries, claiming idle ones, dead-lettering, recreating
a lost group, riding out an outage) is driven in no time at all, next to
the real-Redis tests that check the same against redis-server.  It is no
Redis: only what those commands need, as Redis 7 documents it.
"""

from __future__ import annotations

import hashlib
from typing import Any

import attrs
import txredisapi
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from unrealon.engine.redisclient import REPLY_SCRIPT


@attrs.define
class _Pending:
    consumer: str
    delivered_at: float
    deliveries: int


@attrs.define
class _Group:
    last_id: tuple[int, int] = (0, 0)
    pending: dict[tuple[int, int], _Pending] = attrs.Factory(dict)


def _key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _id(key: tuple[int, int]) -> str:
    return f"{key[0]}-{key[1]}"


class FakeRedis:
    """One fake server; C{handler()} gives a txredisapi-like handler onto it."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.streams: dict[str, dict[tuple[int, int], list[str]]] = {}
        self.groups: dict[tuple[str, str], _Group] = {}
        self.lists: dict[str, list[str]] = {}
        self.up = True
        self._seq = 0
        #: blocked reads: (deadline call, deferred, args)
        self._blocked: list[tuple[Any, Deferred[Any], tuple[Any, ...]]] = []
        self.commands: list[str] = []

    # -- the test's levers ------------------------------------------------------------

    def xadd(self, stream: str, fields: dict[str, str]) -> str:
        self._seq += 1
        key = (int(self.clock.seconds() * 1000), self._seq)
        self.streams.setdefault(stream, {})[key] = [x for kv in fields.items() for x in kv]
        self._wake()
        return _id(key)

    def go_away(self) -> None:
        """Redis is gone: every command in flight or new fails with a lost connection."""
        self.up = False
        blocked, self._blocked = self._blocked, []
        for call, d, _ in blocked:
            call.cancel()
            d.errback(txredisapi.ConnectionError("Lost connection"))

    def come_back(self, empty: bool = False) -> None:
        self.up = True
        if empty:
            self.streams.clear()
            self.groups.clear()
            self.lists.clear()

    def handler(self) -> FakeHandler:
        return FakeHandler(self)

    # -- commands -----------------------------------------------------------------------

    def execute(self, *args: Any, apply_timeout: bool = True) -> Deferred[Any]:
        if not self.up:
            return fail(txredisapi.ConnectionError("Not connected"))
        name = str(args[0]).upper()
        self.commands.append(name)
        try:
            method = getattr(self, "_" + name.lower())
        except AttributeError:
            return fail(txredisapi.ResponseError(f"ERR unknown command '{name}'"))
        try:
            return method(*args[1:])  # type: ignore[no-any-return]
        except txredisapi.ResponseError as e:
            return fail(e)

    def _xgroup(self, sub: str, stream: str, group: str, start: str, *rest: str) -> Deferred[Any]:
        assert sub.upper() == "CREATE"
        if (stream, group) in self.groups:
            raise txredisapi.ResponseError("BUSYGROUP Consumer Group name already exists")
        if stream not in self.streams:
            if "MKSTREAM" not in rest:
                raise txredisapi.ResponseError("ERR The XGROUP subcommand requires the key to exist")
            self.streams[stream] = {}
        self.groups[(stream, group)] = _Group(last_id=(0, 0) if start == "0" else _key(start))
        return succeed("OK")

    def _group(self, stream: str, group: str) -> _Group:
        found = self.groups.get((stream, group))
        if found is None:
            raise txredisapi.ResponseError(
                f"NOGROUP No such key '{stream}' or consumer group '{group}'")
        return found

    def _xreadgroup(self, *args: Any) -> Deferred[Any]:
        _, group, consumer, *rest = args
        count, block, stream, start = _read_options(rest)
        result = self._read_group(stream, group, consumer, count, start)
        if result is not None or block is None:
            return succeed(result)
        d: Deferred[Any] = Deferred()
        call = self.clock.callLater(block / 1000, self._timed_out, d)
        self._blocked.append((call, d, (stream, group, consumer, count, start)))
        return d

    def _read_group(self, stream: str, group: str, consumer: str, count: int,
                    start: str) -> Any:
        g = self._group(stream, group)
        entries = self.streams.get(stream, {})
        now = self.clock.seconds()
        if start == ">":
            keys = sorted(k for k in entries if k > g.last_id)[:count]
            if not keys:
                return None
            for k in keys:
                g.pending[k] = _Pending(consumer, now, 1)
            g.last_id = keys[-1]
            return [[stream, [[_id(k), entries[k]] for k in keys]]]
        after = _key(start)
        mine = sorted(k for k, p in g.pending.items() if p.consumer == consumer and k > after)
        out = []
        for k in mine[:count]:
            g.pending[k].deliveries += 1
            g.pending[k].delivered_at = now
            out.append([_id(k), entries.get(k)])
        return [[stream, out]]

    def _timed_out(self, d: Deferred[Any]) -> None:
        self._blocked = [b for b in self._blocked if b[1] is not d]
        d.callback(None)

    def _wake(self) -> None:
        blocked, self._blocked = self._blocked, []
        for call, d, args in blocked:
            result = self._read_group(*args)
            if result is None:
                self._blocked.append((call, d, args))
            else:
                call.cancel()
                d.callback(result)

    def _xack(self, stream: str, group: str, *ids: str) -> Deferred[Any]:
        g = self._group(stream, group)
        return succeed(sum(1 for i in ids if g.pending.pop(_key(i), None) is not None))

    def _xadd(self, stream: str, *args: str) -> Deferred[Any]:
        args_list = list(args)
        if args_list[0].upper() == "MAXLEN":
            args_list = args_list[3:]
        assert args_list[0] == "*"
        fields = dict(zip(args_list[1::2], args_list[2::2], strict=True))
        return succeed(self.xadd(stream, fields))

    def _xautoclaim(self, stream: str, group: str, consumer: str, idle_ms: int, start: str,
                    _count_word: str, count: int) -> Deferred[Any]:
        g = self._group(stream, group)
        now = self.clock.seconds()
        entries = self.streams.get(stream, {})
        claimed, deleted = [], []
        for k in sorted(g.pending):
            if len(claimed) + len(deleted) >= int(count):
                break
            p = g.pending[k]
            if k < _key(start) or (now - p.delivered_at) * 1000 < int(idle_ms):
                continue
            if k not in entries:
                deleted.append(_id(k))
                del g.pending[k]
                continue
            p.consumer, p.delivered_at, p.deliveries = consumer, now, p.deliveries + 1
            claimed.append([_id(k), entries[k]])
        return succeed(["0-0", claimed, deleted])

    def _xpending(self, stream: str, group: str, *args: Any) -> Deferred[Any]:
        g = self._group(stream, group)
        start, end, count, *consumer = args
        now = self.clock.seconds()
        out = []
        for k in sorted(g.pending):
            p = g.pending[k]
            if k < _key(start) or k > _key(end) or (consumer and p.consumer != consumer[0]):
                continue
            out.append([_id(k), p.consumer, int((now - p.delivered_at) * 1000), p.deliveries])
        return succeed(out[: int(count)])

    def _xinfo(self, sub: str, stream: str) -> Deferred[Any]:
        if stream not in self.streams:
            raise txredisapi.ResponseError("ERR no such key")
        infos = []
        for (s, name), g in self.groups.items():
            if s != stream:
                continue
            lag = sum(1 for k in self.streams[s] if k > g.last_id)
            infos.append(["name", name, "consumers", 1, "pending", len(g.pending),
                          "last-delivered-id", _id(g.last_id), "entries-read", None, "lag", lag])
        return succeed(infos)

    def _xlen(self, stream: str) -> Deferred[Any]:
        return succeed(len(self.streams.get(stream, {})))

    def _client(self, sub: str, *args: Any) -> Deferred[Any]:
        if sub.upper() == "ID":
            return succeed(7)
        blocked, self._blocked = self._blocked, []
        for call, d, _ in blocked:
            call.cancel()
            d.callback(None)
        return succeed(1)

    def _evalsha(self, sha: str, numkeys: int, *args: str) -> Deferred[Any]:
        if sha != REPLY_SCRIPT.sha:
            raise txredisapi.ResponseError("NOSCRIPT No matching script")
        key, payload = args[0], args[1]
        self.lists.setdefault(key, []).insert(0, payload)
        return succeed(1)

    def _script(self, sub: str, source: str) -> Deferred[Any]:
        return succeed(hashlib.sha1(source.encode()).hexdigest())


def _read_options(rest: list[Any]) -> tuple[int, int | None, str, str]:
    count, block = 100, None
    i = 0
    while rest[i] != "STREAMS":
        if rest[i] == "COUNT":
            count = int(rest[i + 1])
        elif rest[i] == "BLOCK":
            block = int(rest[i + 1])
        i += 2
    return count, block, rest[i + 1], rest[i + 2]


class FakeHandler:
    """What the consumer calls: C{execute_command}, as on a txredisapi handler."""

    def __init__(self, server: FakeRedis) -> None:
        self.server = server

    def execute_command(self, *args: Any, apply_timeout: bool = True) -> Deferred[Any]:
        return self.server.execute(*args, apply_timeout=apply_timeout)
