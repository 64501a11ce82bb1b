"""Riding out a Redis restart or a full Redis: clients and the reconciler retry with backoff, for a bounded time.

`wait`, `status`, `reconcile --loop` and the fleet exporter wrap each read (or pass) in
`ride_out`: while Redis refuses connections (restarting, replaying its append-only file) or
refuses writes because it reached `maxmemory` (OOM, with the default `noeviction` policy) they
say so once on stderr and retry with a doubling pause, for up to `VITBATCH_REDIS_RETRY_S`
(default 60 s) per outage; then the error goes to the caller as before. A refused write wrote
nothing (Redis checks memory before it runs a command), so retrying it loses no work. Each
ridden-out OOM refusal is counted through `counted` once Redis takes writes again
(`vitbatch_redis_oom_refusals_total` on the fleet exporter).
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
REDIS_FULL = (redis.exceptions.OutOfMemoryError,)  # "OOM command not allowed when used memory > 'maxmemory'"
RIDDEN_OUT = REDIS_DOWN + REDIS_FULL  # what a pass gives back whole to its caller, to ride out
FIRST_PAUSE_S, LONGEST_PAUSE_S = 0.25, 5.0


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _trouble(error: Exception) -> str:
    if isinstance(error, REDIS_FULL):
        return f"is out of memory and refuses writes ({error}; raise maxmemory or free memory)"
    return f"is unreachable ({error})"


def ride_out(call: Callable[[], T], retry_s: float, what: str = "Redis", tell: Callable[[str], None] = say,
             counted: Callable[[int], None] | None = None) -> T:
    """`call()`, retried while Redis is unreachable or full, for at most `retry_s` seconds of trouble;
    `counted(n)` is told how many OOM refusals were ridden out once the call succeeds. The time
    counts from the first refusal: a call that itself spent seconds reconnecting is still retried."""
    deadline, pause, told, full = None, FIRST_PAUSE_S, False, 0
    while True:
        try:
            result = call()
        except RIDDEN_OUT as e:
            full += isinstance(e, REDIS_FULL)
            deadline = deadline or time.monotonic() + retry_s
            if time.monotonic() + pause > deadline:
                if told:
                    tell(f"{what} still {_trouble(e)} after {retry_s:.0f} s (VITBATCH_REDIS_RETRY_S): giving up")
                raise
            if not told:
                tell(f"{what} {_trouble(e)}; retrying for up to {retry_s:.0f} s (VITBATCH_REDIS_RETRY_S)")
                told = True
            time.sleep(pause)
            pause = min(pause * 2, LONGEST_PAUSE_S)
            continue
        if told:
            tell(f"{what} is answering again" + (f" ({full} write(s) refused for lack of memory)" if full else ""))
        if full and counted is not None:
            counted(full)
        return result
