"""A first end-to-end check that the fixtures and a node work together."""

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.helpers.node import mint_token, start_node


class NodeSmokeTests(TestCase):
    @inlineCallbacks
    def test_ping_and_join(self):
        """An authenticated client pings and joins a room it is granted."""
        running = yield start_node(self)
        client = yield running.connect(mint_token("alice", rooms=["workspace:*"]))
        result = yield client.call("system.ping")
        self.assertIs(result["pong"], True)
        joined = yield client.call("rooms.join", {"room": "workspace:1"})
        self.assertEqual(joined["room"], "workspace:1")
        self.assertFalse(joined["recovered"])
        yield running.node.broker.publish("workspace:1", "workspace.file_changed", {"path": "a"})
        event = yield client.next()
        self.assertEqual(event["method"], "workspace.file_changed")
        self.assertEqual(event["params"]["data"], {"path": "a"})
        yield client.close()
