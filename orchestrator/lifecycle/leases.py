"""Output leases: one live job per output prefix, taken atomically in Redis.

A lease is a string key per prefix, "<job id> <unix time by Redis's clock>", set by one Lua script
only when the prefix is free, already this job's, or held by a job that has ended (or never
reached Redis within the grace period: a submitter that died mid-plan). Released when the job
ends. Its time is Redis's (`TIME`), so two submitters' clocks are never compared.
"""

from __future__ import annotations

import redis

from orchestrator import constants as k
from orchestrator.errors import BrokerUnavailable, OutputBusy

OUTPUT_LEASE_GRACE_S = 600.0  # a lease whose job never reached Redis (a submitter died mid-plan) lapses

_HOLD_OUTPUT = """
local held = redis.call('GET', KEYS[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
if held then
  local holder, since = string.match(held, '^(%S+) (%S+)$')
  if holder ~= ARGV[1] then
    local state = redis.call('HGET', ARGV[3] .. holder, 'state')
    local ended = state and state ~= 'queued' and state ~= 'running'
    local lapsed = (not state) and (now - tonumber(since) > tonumber(ARGV[2]))
    if not (ended or lapsed) then return holder end
  end
end
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. string.format('%.3f', now))
return false
"""
_RELEASE_OUTPUT = """
local held = redis.call('GET', KEYS[1])
if held and string.match(held, '^(%S+) ') == ARGV[1] then redis.call('DEL', KEYS[1]) end
"""


def _is_oom(error: redis.RedisError) -> bool:
    # redis-py raises OutOfMemoryError for Redis's -OOM reply (its text no longer says "OOM").
    return isinstance(error, redis.exceptions.OutOfMemoryError) or "maxmemory" in str(error)


def hold_output(r: redis.Redis, output: str, job_id: str) -> None:
    """Take the output prefix for `job_id`; OutputBusy when another live job holds it."""
    try:
        holder = r.eval(_HOLD_OUTPUT, 1, k.output_lease_key(output), job_id, OUTPUT_LEASE_GRACE_S, k.job_key(""))
    except redis.RedisError as e:
        if _is_oom(e):
            raise BrokerUnavailable("Redis is out of memory (maxmemory reached with noeviction): raise "
                                    "maxmemory or free keys; nothing was written or enqueued") from e
        raise BrokerUnavailable(f"Redis is unreachable ({e}); nothing was written or enqueued") from e
    if holder:
        raise OutputBusy(f"{output} is held by job {holder}, which is still queued or running: wait for it "
                         f"(`vitbatch wait {holder}`), cancel it (`vitbatch cancel {holder}`), or choose "
                         "another output; nothing was written")


def release_output(r: redis.Redis, output: str, job_id: str) -> None:
    r.eval(_RELEASE_OUTPUT, 1, k.output_lease_key(output), job_id)
