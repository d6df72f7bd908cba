"""
A private Redis with a replica and a Sentinel watching them, on loopback TCP
ports (a replica and a Sentinel reach the master by address), every process
started and stopped by the test like L{start_redis}'s.

    group = yield start_sentinel_group(self)
    group.url          # redis+sentinel://127.0.0.1:<port>/mymaster
    yield group.fail_over()   # SIGKILL the master; fires once the replica is master
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorProcess
from twisted.trial import unittest

from tests.helpers.process import free_port
from tests.helpers.redis_server import RedisServer, redis_server_binary
from tests.helpers.waiting import wait_until

SERVICE = "mymaster"
#: how long the Sentinel waits before it calls a silent master down
DOWN_AFTER_MS = 500


class SentinelServer(RedisServer):
    """redis-server in Sentinel mode, monitoring one master (quorum 1)."""

    ready_marker = b"+monitor master"

    def __init__(self, reactor: IReactorProcess, directory: str, port: int,
                 master_port: int) -> None:
        super().__init__(reactor, directory)
        self.port = port
        self.master_port = master_port

    def _argv(self, binary: str) -> list[str]:
        os.makedirs(self.directory, exist_ok=True)
        conf = os.path.join(self.directory, "sentinel.conf")
        with open(conf, "w") as f:
            f.write(
                f"port {self.port}\nbind 127.0.0.1\ndir {self.directory}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.master_port} 1\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
            )
        return [binary, conf, "--sentinel"]


class SentinelGroup:
    """A master, its replica and one Sentinel."""

    def __init__(self, master: RedisServer, replica: RedisServer, sentinel: SentinelServer,
                 ports: Sequence[int]) -> None:
        self.master = master
        self.replica = replica
        self.sentinel = sentinel
        self.master_port, self.replica_port, self.sentinel_port = ports
        self.url = f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{SERVICE}"

    def fail_over(self, timeout: float = 20.0) -> Deferred[None]:
        """SIGKILL the master; fires once the Sentinel names the replica master."""
        import redis

        sentinel = redis.Redis(host="127.0.0.1", port=self.sentinel_port)

        async def go() -> None:
            await self.master.kill()
            await wait_until(
                lambda: int(sentinel.sentinel_get_master_addr_by_name(SERVICE)[1])
                == self.replica_port,
                timeout=timeout, what="the Sentinel's failover to the replica")
            sentinel.close()

        return Deferred.fromCoroutine(go())


def start_sentinel_group(testcase: unittest.TestCase) -> Deferred[SentinelGroup]:
    if redis_server_binary() is None:
        raise unittest.SkipTest("redis-server is not installed")
    from twisted.internet import reactor

    process_reactor = cast(IReactorProcess, reactor)
    ports = (free_port(), free_port(), free_port())
    tcp = ["--port", str(ports[0]), "--bind", "127.0.0.1"]
    master = RedisServer(process_reactor, testcase.mktemp(), extra_args=tcp)
    replica = RedisServer(process_reactor, testcase.mktemp(), extra_args=[
        "--port", str(ports[1]), "--bind", "127.0.0.1",
        "--replicaof", "127.0.0.1", str(ports[0])])
    sentinel = SentinelServer(process_reactor, testcase.mktemp(), ports[2], ports[0])
    for server in (sentinel, replica, master):
        testcase.addCleanup(server.close)

    async def go() -> SentinelGroup:
        await master.start()
        await replica.start()
        await sentinel.start()
        group = SentinelGroup(master, replica, sentinel, ports)
        import redis

        r = redis.Redis(host="127.0.0.1", port=ports[1])
        # the replica has synced (else a failover could not pick it)
        await wait_until(lambda: r.info("replication").get("master_link_status") == "up",
                         what="the replica in sync")
        r.close()
        s = redis.Redis(host="127.0.0.1", port=ports[2])
        # the Sentinel knows the replica (else it has no one to promote)
        await wait_until(lambda: bool(s.sentinel_slaves(SERVICE)), timeout=15,
                         what="the Sentinel to find the replica")
        s.close()
        return group

    return Deferred.fromCoroutine(go())
