"""
The base of the backend package's producer tests: a private redis-server, a
synchronous redis-py client on it, a L{Publisher} writing through that
client, and what was appended to the ingress stream.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase
from unrealon_backend import Publisher

from tests.helpers.ingress_support import sync_redis
from tests.helpers.redis_server import start_redis

STREAM = "stream:requests"


class PublisherTestCase(TestCase):
    timeout = 20

    @inlineCallbacks
    def setUp(self) -> Any:
        self.server = yield start_redis(self)
        self.r = sync_redis(self.server.url)
        self.addCleanup(self.r.close)
        self.publisher = Publisher(self.r)

    def entries(self, stream: str = STREAM) -> list[tuple[str, dict[str, Any]]]:
        """(entry id, payload) of every entry of C{stream}; each has one field, payload."""
        out = []
        for entry_id, fields in self.r.xrange(stream):
            self.assertEqual(list(fields), ["payload"])
            out.append((entry_id, json.loads(fields["payload"])))
        return out

    def payloads(self, stream: str = STREAM) -> list[dict[str, Any]]:
        return [payload for _, payload in self.entries(stream)]

    def last(self) -> dict[str, Any]:
        entries = self.entries()
        self.assertTrue(entries)
        return entries[-1][1]
