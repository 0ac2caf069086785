"""Waiting on an asyncio event with a timeout, without losing a cancellation."""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``event``; True if it was set.

    Not ``asyncio.wait_for``: on Python 3.11 it swallows a cancellation that arrives just
    as the awaited event is set (bpo-42130). A worker told to stop by Ctrl-C at the moment
    a notification woke it then went on working; ``asyncio.timeout`` keeps the cancellation.
    """
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
        return True
    except TimeoutError:
        return False
