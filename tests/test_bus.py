"""Bus helpers against a real nats-server."""

from __future__ import annotations

import asyncio

import nats
import pytest

from switchyard.bus.queue import flushed
from switchyard.bus.server import NatsServer

pytestmark = pytest.mark.integration


def test_flushed_is_a_barrier_for_a_subscription_another_connection_publishes_to(nats_server: NatsServer) -> None:
    """A message published on connection B right after `flushed(A)` reaches A's new
    subscription, every time (a plain `flush()` lets the SUB trail its PING: the message is
    then missed when the machine is busy)."""
    async def main() -> None:
        a, b = await nats.connect(nats_server.url), await nats.connect(nats_server.url)
        try:
            for i in range(200):
                sub = await a.subscribe(f"barrier.{i}")
                await flushed(a)
                await b.publish(f"barrier.{i}", str(i).encode())
                await flushed(b)
                assert (await sub.next_msg(timeout=2)).data == str(i).encode()
                await sub.unsubscribe()
        finally:
            await a.close()
            await b.close()
    asyncio.run(main())
