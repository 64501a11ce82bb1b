"""Fencing: every delivery of a shard holds a lease token, and the ledger refuses a stale one.

A delivery's token is granted atomically when it starts (the shard's lease counter, HINCRBY,
never reset). The reconciler handing a silent or stalled shard to another worker, `retry`
and the next delivery all move the counter on, so a worker that comes back from a partition
holds a token that is no longer the shard's: its commit, progress, heartbeat, hold or state
change is refused, in the same Lua script that would have written it. A job that has ended
takes no writes from any delivery, and is published once: the worker or reconciler that
publishes first claims the job, and the job's end is recorded only under that claim.

Every time these scripts store or compare (grant, heartbeat, progress, a retry's hold, the
stall and silence checks, the publication claim, the job's end) is Redis's own clock (`TIME`),
never a worker's or the reconciler's: a host whose clock is minutes off still holds its shards.
Durations (stale after, stall after, a backoff) come in as seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

PUBLISH_CLAIM_S = 600.0  # a publisher silent this long (died mid-publication) is taken over


@dataclass(frozen=True)
class Lease:
    """One delivery's hold on a shard: `token` is what the ledger checks; `attempts`, deliveries so far."""

    job_id: str
    shard: int
    token: int
    attempts: int = 0


@dataclass(frozen=True)
class Publication:
    """A claim to publish an ended job's record: `finished_at` is fixed at the first claim, so a
    publisher that takes over a dead one writes the same bytes; `prefix_holder` is the job
    that holds the output prefix now ("" when none)."""

    job_id: str
    claimer: str
    finished_at: float
    prefix_holder: str


# Redis's clock, in seconds (scripts are replicated by their effects, so TIME is allowed).
NOW = "local function now() local t = redis.call('TIME') return tonumber(t[1]) + tonumber(t[2]) / 1e6 end\n"
LIVE = NOW + "local function live(state) return state == 'queued' or state == 'running' end\n"

# KEYS: job, shard states, attempts, leases, heartbeats, advanced. ARGV: shard, count ('1'/'').
GRANT = LIVE + """
if not live(redis.call('HGET', KEYS[1], 'state')) then return {0, 0} end
local attempts = 0
if ARGV[2] == '1' then attempts = redis.call('HINCRBY', KEYS[3], ARGV[1], 1) end
local token = redis.call('HINCRBY', KEYS[4], ARGV[1], 1)
if ARGV[2] == '1' and redis.call('HGET', KEYS[2], ARGV[1]) ~= 'committed' then
  local t = now()
  redis.call('HSET', KEYS[2], ARGV[1], 'running')
  redis.call('HSET', KEYS[5], ARGV[1], t)
  redis.call('HSET', KEYS[6], ARGV[1], t)
  redis.call('HSETNX', KEYS[1], 'started_at', t)
  if redis.call('HGET', KEYS[1], 'state') == 'queued' then redis.call('HSET', KEYS[1], 'state', 'running') end
end
return {token, attempts}
"""

# The shared prologue of every fenced write. KEYS[1]: job, KEYS[2]: leases; ARGV[1]: shard, ARGV[2]: token.
# Returns 'stale' when another delivery holds the shard, 'ended:<state>' when the job is over.
FENCE = LIVE + """
local state = redis.call('HGET', KEYS[1], 'state')
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 'stale' end
if not live(state) then return 'ended:' .. (state or 'missing') end
"""

# KEYS: job, leases, shard states, heartbeats. ARGV: shard, token.
HEARTBEAT = FENCE + """
if redis.call('HGET', KEYS[3], ARGV[1]) ~= 'running' then return 'stale' end
redis.call('HSET', KEYS[4], ARGV[1], now())
return 'ok'
"""

# Progress only moves forward (a late write cannot lower the count), and moving it is what
# the stall check watches. KEYS: job, leases, shard states, done, advanced. ARGV: shard, token, done.
PROGRESS = FENCE + """
if redis.call('HGET', KEYS[3], ARGV[1]) ~= 'running' then return 'stale' end
local done = tonumber(ARGV[3])
if done > tonumber(redis.call('HGET', KEYS[4], ARGV[1]) or '0') then
  redis.call('HSET', KEYS[4], ARGV[1], done)
  redis.call('HSET', KEYS[5], ARGV[1], now())
end
return 'ok'
"""

# A heartbeat in the future: the reconciler leaves the shard alone until then.
# KEYS: job, leases, heartbeats. ARGV: shard, token, seconds.
HOLD = FENCE + """
redis.call('HSET', KEYS[3], ARGV[1], now() + tonumber(ARGV[3]))
return 'ok'
"""

# KEYS: job, leases, shard states, heartbeats. ARGV: shard, token. (A cancelled job is ended, so
# this prologue is its own: only the token is checked.)
STAND_DOWN = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 'stale' end
if redis.call('HGET', KEYS[3], ARGV[1]) == 'running' then redis.call('HSET', KEYS[3], ARGV[1], 'pending') end
redis.call('HSET', KEYS[4], ARGV[1], 0)
return 'ok'
"""

# Whether every shard has settled, without reading all of them on every commit (HVALS of 10,000
# states made each commit O(shards): bench/control_plane.py). The job keeps the shard it last
# found unsettled ('unsettled_from'); while that one is unsettled the answer is known at once,
# else the scan goes on from there, round every shard, and 'ok:1' only once all were seen settled.
# KEYS[1]: job, KEYS[3]: shard states (fields 0 .. n_shards - 1).
SETTLED = """
local n = tonumber(redis.call('HGET', KEYS[1], 'n_shards') or '0')
local from = tonumber(redis.call('HGET', KEYS[1], 'unsettled_from') or '0')
for step = 0, n - 1 do
  local i = (from + step) % n
  local s = redis.call('HGET', KEYS[3], tostring(i))
  if s and s ~= 'committed' and s ~= 'failed' then
    if step > 0 then redis.call('HSET', KEYS[1], 'unsettled_from', i) end
    return 'ok:0'
  end
end
return 'ok:1'
"""

# KEYS: job, leases, shard states, heartbeats, done, errors, stats, reasons.
# ARGV: shard, token, done, errors, stats json.
COMMIT = FENCE + """
if redis.call('HGET', KEYS[3], ARGV[1]) == 'failed' then return 'stale' end
redis.call('HSET', KEYS[3], ARGV[1], 'committed')
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('HSET', KEYS[5], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[6], ARGV[1], ARGV[4])
redis.call('HSET', KEYS[7], ARGV[1], ARGV[5])
redis.call('HDEL', KEYS[8], ARGV[1])
""" + SETTLED

# KEYS: job, leases, shard states, reasons. ARGV: shard, token, reason.
FAIL_SHARD = FENCE + """
redis.call('HSET', KEYS[3], ARGV[1], 'failed')
redis.call('HSET', KEYS[4], ARGV[1], ARGV[3])
""" + SETTLED

# KEYS: job, leases, output lease, every job key (to expire). ARGV: state, reason, (unused), terminal
# ('1'/''), ttl, shard ('' when not a delivery's), token, claimer ('' when not a publisher's),
# job id, channel, claim seconds. An ended job's state never changes here (`retry` reopens it).
SET_STATE = LIVE + """
local current = redis.call('HGET', KEYS[1], 'state')
if not current then return 'missing' end
if not live(current) then return 'ended:' .. current end
if ARGV[6] ~= '' and redis.call('HGET', KEYS[2], ARGV[6]) ~= ARGV[7] then return 'stale' end
local publisher = redis.call('HGET', KEYS[1], 'publisher')
if ARGV[8] ~= '' then
  if publisher ~= ARGV[8] then return 'stale' end
elseif publisher and now() - tonumber(redis.call('HGET', KEYS[1], 'publish_claimed_at') or '0')
    < tonumber(ARGV[11]) then
  return 'publishing'
end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'reason', ARGV[2]) end
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], 'finished_at', now())
  local held = redis.call('GET', KEYS[3])
  if held and string.match(held, '^(%S+) ') == ARGV[9] then redis.call('DEL', KEYS[3]) end
  for i = 4, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[5]) end
end
redis.call('PUBLISH', ARGV[10], ARGV[1])
return 'ok'
"""

# KEYS: job, shard states, output lease. ARGV: claimer, (unused), claim seconds.
# Returns {'ok', finished_at, prefix holder}, {'ended', state}, {'busy'} or {'unsettled'}.
CLAIM_PUBLICATION = LIVE + """
local state = redis.call('HGET', KEYS[1], 'state')
if not live(state) then return {'ended', state or 'missing'} end
for _, s in ipairs(redis.call('HVALS', KEYS[2])) do
  if s ~= 'committed' and s ~= 'failed' then return {'unsettled'} end
end
local publisher = redis.call('HGET', KEYS[1], 'publisher')
local since = tonumber(redis.call('HGET', KEYS[1], 'publish_claimed_at') or '0')
local t = now()
if publisher and publisher ~= ARGV[1] and t - since < tonumber(ARGV[3]) then return {'busy'} end
redis.call('HSET', KEYS[1], 'publisher', ARGV[1], 'publish_claimed_at', t)
redis.call('HSETNX', KEYS[1], 'publish_finished_at', t)
local held = redis.call('GET', KEYS[3]) or ''
return {'ok', redis.call('HGET', KEYS[1], 'publish_finished_at'), string.match(held, '^(%S+) ') or ''}
"""

# KEYS: job. ARGV: claimer. A publisher that failed before recording the end lets the next one in.
RELEASE_PUBLICATION = """
if redis.call('HGET', KEYS[1], 'publisher') == ARGV[1] then redis.call('HDEL', KEYS[1], 'publisher') end
"""

# A running shard silent for `stale` seconds, or (when `stall` > 0) alive but not advanced for
# `stall` seconds, goes back to pending and its lease moves on: the holder is fenced off.
# KEYS: shard states, heartbeats, advanced, leases. ARGV: shard, stale, stall.
REQUEUE = NOW + """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= 'running' then return '' end
local beat = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local t = now()
local why = ''
if beat < t - tonumber(ARGV[2]) then
  why = 'silent'
elseif tonumber(ARGV[3]) > 0 and beat <= t then  -- a hold in the future is a retry's backoff
  local advanced = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or t)
  if advanced < t - tonumber(ARGV[3]) then why = 'stalled' end
end
if why == '' then return '' end
redis.call('HSET', KEYS[1], ARGV[1], 'pending')
redis.call('HSET', KEYS[2], ARGV[1], t)
redis.call('HINCRBY', KEYS[4], ARGV[1], 1)
return why
"""
