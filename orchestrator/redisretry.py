"""Riding out a Redis restart: clients and the reconciler retry with backoff, for a bounded time.

`wait`, `status`, `reconcile --loop` and the fleet exporter wrap each read (or pass) in
`ride_out`: while Redis refuses connections (restarting, replaying its append-only file) they
say so once on stderr and retry with a doubling pause, for up to `VITBATCH_REDIS_RETRY_S`
(default 60 s) per outage; then the error goes to the caller as before.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from kombu.exceptions import OperationalError

T = TypeVar("T")
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, OperationalError)  # BusyLoadingError is a ConnectionError
FIRST_PAUSE_S, LONGEST_PAUSE_S = 0.25, 5.0


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def ride_out(call: Callable[[], T], retry_s: float, what: str = "Redis", tell: Callable[[str], None] = say) -> T:
    """`call()`, retried while Redis is unreachable, for at most `retry_s` seconds of outage."""
    deadline, pause, told = time.monotonic() + retry_s, FIRST_PAUSE_S, False
    while True:
        try:
            result = call()
        except REDIS_DOWN as e:
            if time.monotonic() + pause > deadline:
                if told:
                    tell(f"{what} still unreachable after {retry_s:.0f} s (VITBATCH_REDIS_RETRY_S): giving up")
                raise
            if not told:
                tell(f"{what} is unreachable ({e}); retrying for up to {retry_s:.0f} s (VITBATCH_REDIS_RETRY_S)")
                told = True
            time.sleep(pause)
            pause = min(pause * 2, LONGEST_PAUSE_S)
            continue
        if told:
            tell(f"{what} is reachable again")
        return result
