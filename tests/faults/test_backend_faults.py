"""
Redis going away under browser calls to backend methods (PROTOCOL.md sections
1 and 9.3): a call in flight when Redis restarts (with its data) is still answered,
once; one whose connection the node closes for recovery (Redis back empty)
is not left pending; calls made after either work again -- with a real node, a real worker process and
a real client.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.helpers.backend import start_worker
from tests.helpers.node import mint_token, start_node
from tests.helpers.redis_server import start_redis
from tests.helpers.waiting import sleep, wait_until


class BackendCallsAcrossRedisRestartTests(TestCase):
    timeout = 90

    @inlineCallbacks
    def scenario(self, persistent: bool) -> Any:
        server = yield start_redis(self, persistent=persistent)
        running = yield start_node(self, redis_url=server.url, node_id="n1")
        yield start_worker(self, server.url, "w1")
        client = yield running.connect(mint_token("ann", methods=["test.*"]))
        self.addCleanup(client.drop)

        async def callable_now() -> bool:
            doc = await client.call("rpc.discover")
            return any(m["name"] == "test.slow_once" for m in doc["methods"])
        yield wait_until(callable_now, timeout=5, interval=0.1, what="declared")
        client.send({"jsonrpc": "2.0", "id": 1, "method": "test.slow_once",
                     "params": {"seconds": 2}})
        yield sleep(0.7)  # the handler is running
        yield server.restart()
        if persistent:
            reply = yield client.next(timeout=15)
            self.assertEqual(reply, {"jsonrpc": "2.0", "id": 1, "result": {"delivery": 1}})
        else:
            # the cluster feed was lost with the data: the node closes its
            # connections with 1001 so clients rejoin with their cursors (section 1);
            # a call in flight goes with its connection (cancelled, never answered)
            code, _ = yield client.closed
            self.assertEqual(code, 1001)
            self.assertEqual(running.node.backend.in_flight(), 0)
            client = yield running.connect(mint_token("ann", methods=["test.*"]))
            self.addCleanup(client.drop)
        # Redis back (empty or not): workers declare again, calls work again
        async def works() -> bool:
            answer = await client.request("test.echo", {"text": "again"}, timeout=5)
            return bool(answer.get("result", {}).get("echo") == "again")
        yield wait_until(works, timeout=15, interval=0.3, what="calls working again")
        yield client.call("system.ping")
        self.assertEqual(list(client.messages), [], "nothing more about the first call")
        self.assertEqual(running.node.backend.in_flight(), 0)

    def test_redis_restarted_empty(self) -> Any:
        """
        Redis comes back without its data: the node makes its clients recover
        (1001), their calls go with them, and calls work again after.
        """
        return self.scenario(persistent=False)

    def test_redis_restarted_with_its_data(self) -> Any:
        """
        Redis comes back with its data (append-only file): the call running
        across the restart is answered, once, on the same connection.
        """
        return self.scenario(persistent=True)
