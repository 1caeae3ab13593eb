"""The services' event loop: uvloop when installed (a libuv loop: cheaper hand-offs between
the NATS client, gRPC and HTTP), asyncio's own otherwise."""

from __future__ import annotations

import asyncio
import os
from typing import Any, Coroutine


def run(main: Coroutine[Any, Any, None]) -> None:
    if os.environ.get("SWITCHYARD_EVENT_LOOP", "uvloop") == "uvloop":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(main)
            return
    asyncio.run(main)
