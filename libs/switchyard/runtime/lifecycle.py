"""Service lifecycle: logging set-up and signal → asyncio.Event → graceful stop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal


def setup_logging(service: str) -> None:
    level = os.environ.get("SWITCHYARD_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level,
                        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s")


def stop_event() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM, so a service can drain instead of dying mid-request."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, event.set)
    return event
