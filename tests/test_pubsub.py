"""
The subscriber connection's RESP2 reading and writing (unrealon.engine.pubsub),
on a StringTransport: what it reports, whatever way the bytes are split.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from unrealon.engine.pubsub import SubscriberProtocol, encode_command
from unrealon.redisurl import parse_redis_url


class _Listener:
    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    def connected(self, protocol: Any) -> None:
        self.seen.append(("connected",))

    def disconnected(self) -> None:
        self.seen.append(("disconnected",))

    def subscribed(self, channel: bytes) -> None:
        self.seen.append(("subscribed", channel))

    def message(self, channel: bytes, payload: bytes) -> None:
        self.seen.append(("message", channel, payload))


def _push(*parts: bytes | int) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b":%d\r\n" % part if isinstance(part, int)
                   else b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


class SubscriberProtocolTests(SynchronousTestCase):
    def connect(self, url: str = "redis://localhost", name: str | None = None) -> Any:
        self.listener = _Listener()
        self.protocol = SubscriberProtocol(self.listener, parse_redis_url(url), name)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        return self.protocol

    def test_login_and_name_before_anything(self) -> None:
        self.connect("redis://bob:s3cret@localhost", name="unrealon-rooms-n1")
        self.assertEqual(self.transport.value(),
                         encode_command("AUTH", "bob", "s3cret")
                         + encode_command("CLIENT", "SETNAME", "unrealon-rooms-n1"))
        self.assertEqual(self.listener.seen, [("connected",)])

    def test_subscribe_in_commands_of_at_most_1000_channels(self) -> None:
        self.connect()
        channels = [b"c%d" % i for i in range(1500)]
        self.protocol.subscribe(channels)
        self.assertEqual(self.transport.value(),
                         encode_command(b"SUBSCRIBE", *channels[:1000])
                         + encode_command(b"SUBSCRIBE", *channels[1000:]))

    def test_replies_split_anywhere(self) -> None:
        """Confirmations and messages (binary-safe, CRLF inside) at every split point."""
        stream = (b"+OK\r\n" + _push(b"subscribe", b"r:{a}", 1)
                  + _push(b"message", b"r:{a}", b"e0-0\nE:1-0\n{\"x\":\"\r\n\"}")
                  + _push(b"unsubscribe", b"r:{a}", 0)
                  + _push(b"message", b"r:{b}", "é".encode()))
        expected = [("connected",), ("subscribed", b"r:{a}"),
                    ("message", b"r:{a}", b"e0-0\nE:1-0\n{\"x\":\"\r\n\"}"),
                    ("message", b"r:{b}", "é".encode())]
        for split in range(len(stream) + 1):
            self.connect()
            self.protocol.dataReceived(stream[:split])
            self.protocol.dataReceived(stream[split:])
            self.assertEqual(self.listener.seen, expected, f"split at {split}")
        # byte by byte
        self.connect()
        for i in range(len(stream)):
            self.protocol.dataReceived(stream[i : i + 1])
        self.assertEqual(self.listener.seen, expected)

    def test_refused_command_closes_the_connection(self) -> None:
        self.connect()
        self.protocol.dataReceived(b"-WRONGPASS invalid username-password pair\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_garbage_closes_the_connection(self) -> None:
        self.connect()
        self.protocol.dataReceived(b"?what\r\n")
        self.assertTrue(self.transport.disconnecting)
        self.flushLoggedErrors(ValueError)

    def test_lost_connection_is_reported_once(self) -> None:
        self.connect()
        self.protocol.connectionLost()
        self.protocol.connectionLost()
        self.assertEqual(self.listener.seen, [("connected",), ("disconnected",)])
