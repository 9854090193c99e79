"""The Lua scripts of the budget store. Every key a script touches starts with the one hash tag
`{tally:budget}`, so on a Redis Cluster they all live in one slot and each script is atomic.

Layout (P = "{tally:budget}:"):
  P loaded                        set by a reconcile; absent after FLUSHALL -> scripts answer NOT_LOADED
  P cfg:<scope>                   hash: per, tz (the period), lim (micro-units; absent = unlimited), dis ("1")
  P c:<scope>:<per>:<tz>:<epoch>  hash: s (settled spend), r (open reservations), micro-units
  P r:<request id>                hash: st (o open, s settled, r released, x expired), k, a, c1, c2, x
  P rexp                          sorted set of open reservations by expiry (ms)
  P p:<per>:<tz>:<epoch>          hash: provider -> settled spend in the global period
  P events                        the enforcement event stream
"""

from __future__ import annotations

# Shared helpers, prepended to the scripts that need them.
_HELPERS = """
local function cfg(key, dper, dtz)
  local v = redis.call('HMGET', key, 'per', 'tz', 'lim', 'dis')
  local per, tz = v[1], v[2]
  if not per then per, tz = dper, dtz end
  local lim = -1
  if v[3] then lim = tonumber(v[3]) end
  return per, tz, lim, v[4] == '1'
end
local function counters(key)
  local v = redis.call('HMGET', key, 's', 'r')
  return tonumber(v[1]) or 0, tonumber(v[2]) or 0
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function sweep(prefix, rexp, now, limit)
  local due = redis.call('ZRANGEBYSCORE', rexp, '-inf', now, 'LIMIT', 0, limit)
  for _, rid in ipairs(due) do
    local rk = prefix .. rid
    local r = redis.call('HMGET', rk, 'st', 'a', 'c1', 'c2')
    if r[1] == 'o' then
      local a = tonumber(r[2])
      redis.call('HINCRBY', r[3], 'r', -a)
      redis.call('HINCRBY', r[4], 'r', -a)
      redis.call('HSET', rk, 'st', 'x')
    end
    redis.call('ZREM', rexp, rid)
  end
  return #due
end
local function expire_at(key, at)
  if at ~= '0' then redis.call('EXPIREAT', key, at) end
end
"""

# KEYS: loaded, key cfg, global cfg, key counter, global counter, reservation, rexp
# ARGV: request id, key id, estimate, key per, key tz, global per, global tz, default per, default tz,
#       ttl ms, key counter expire-at, global counter expire-at, reservation key ttl ms,
#       reservation key prefix, sweep limit
# -> {0} not loaded | {1, kper, ktz, gper, gtz} stale config |
#    {2, reason, klim, kcommitted, glim, gcommitted} denied (1 disabled, 2 key, 3 global) |
#    {3, expires ms, klim, kcommitted, glim, gcommitted, replayed}
AUTHORIZE = (
    _HELPERS
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local kper, ktz, klim, kdis = cfg(KEYS[2], ARGV[8], ARGV[9])
local gper, gtz, glim = cfg(KEYS[3], ARGV[8], ARGV[9])
if kper ~= ARGV[4] or ktz ~= ARGV[5] or gper ~= ARGV[6] or gtz ~= ARGV[7] then
  return {1, kper, ktz, gper, gtz}
end
local now = now_ms()
sweep(ARGV[14], KEYS[7], now, tonumber(ARGV[15]))
local prior = redis.call('HMGET', KEYS[6], 'st', 'x')
local ks, kr = counters(KEYS[4])
local gs, gr = counters(KEYS[5])
if prior[1] then
  return {3, tonumber(prior[2]) or 0, klim, ks + kr, glim, gs + gr, 1}
end
if kdis then return {2, 1, klim, ks + kr, glim, gs + gr} end
local est = tonumber(ARGV[3])
if klim >= 0 and ks + kr + est > klim then return {2, 2, klim, ks + kr, glim, gs + gr} end
if glim >= 0 and gs + gr + est > glim then return {2, 3, klim, ks + kr, glim, gs + gr} end
local exp = now + tonumber(ARGV[10])
redis.call('HINCRBY', KEYS[4], 'r', ARGV[3])
redis.call('HINCRBY', KEYS[5], 'r', ARGV[3])
expire_at(KEYS[4], ARGV[11])
expire_at(KEYS[5], ARGV[12])
redis.call('HSET', KEYS[6], 'st', 'o', 'k', ARGV[2], 'a', ARGV[3], 'c1', KEYS[4], 'c2', KEYS[5], 'x', exp)
redis.call('PEXPIRE', KEYS[6], ARGV[13])
redis.call('ZADD', KEYS[7], exp, ARGV[1])
return {3, exp, klim, ks + kr + est, glim, gs + gr + est, 0}
"""
)

# KEYS: loaded, key cfg, global cfg, key counter, global counter, reservation, rexp, provider hash
# ARGV: request id, key id, actual, key per, key tz, global per, global tz, default per, default tz,
#       settled marker ttl ms, key counter expire-at, global counter expire-at, provider
# -> {0} | {1, ...} stale | {2, klim, ks, kr, glim, gs, gr} already settled |
#    {3, overspend, klim, ks, kr, glim, gs, gr, ks before, gs before}
SETTLE = (
    _HELPERS
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local kper, ktz, klim = cfg(KEYS[2], ARGV[8], ARGV[9])
local gper, gtz, glim = cfg(KEYS[3], ARGV[8], ARGV[9])
if kper ~= ARGV[4] or ktz ~= ARGV[5] or gper ~= ARGV[6] or gtz ~= ARGV[7] then
  return {1, kper, ktz, gper, gtz}
end
local r = redis.call('HMGET', KEYS[6], 'st', 'a', 'c1', 'c2')
if r[1] == 's' then
  local ks, kr = counters(KEYS[4])
  local gs, gr = counters(KEYS[5])
  return {2, klim, ks, kr, glim, gs, gr}
end
local actual = tonumber(ARGV[3])
local reserved = 0
if r[1] == 'o' then
  reserved = tonumber(r[2])
  redis.call('HINCRBY', r[3], 'r', -reserved)
  redis.call('HINCRBY', r[4], 'r', -reserved)
  redis.call('ZREM', KEYS[7], ARGV[1])
end
local over = 0
if actual > reserved then over = actual - reserved end
local kb = counters(KEYS[4])
local gb = counters(KEYS[5])
redis.call('HINCRBY', KEYS[4], 's', ARGV[3])
redis.call('HINCRBY', KEYS[5], 's', ARGV[3])
expire_at(KEYS[4], ARGV[11])
expire_at(KEYS[5], ARGV[12])
if ARGV[13] ~= '' then
  redis.call('HINCRBY', KEYS[8], ARGV[13], ARGV[3])
  expire_at(KEYS[8], ARGV[12])
end
redis.call('HSET', KEYS[6], 'st', 's', 'k', ARGV[2], 'a', ARGV[3])
redis.call('HDEL', KEYS[6], 'c1', 'c2', 'x')
redis.call('PEXPIRE', KEYS[6], ARGV[10])
local ks, kr = counters(KEYS[4])
local gs, gr = counters(KEYS[5])
return {3, over, klim, ks, kr, glim, gs, gr, kb, gb}
"""
)

# KEYS: reservation, rexp. ARGV: request id. -> 1 released | 0 nothing open
RELEASE = """
local r = redis.call('HMGET', KEYS[1], 'st', 'a', 'c1', 'c2')
if r[1] ~= 'o' then return 0 end
local a = tonumber(r[2])
redis.call('HINCRBY', r[3], 'r', -a)
redis.call('HINCRBY', r[4], 'r', -a)
redis.call('HSET', KEYS[1], 'st', 'r')
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

# KEYS: rexp. ARGV: reservation key prefix, limit. -> reservations lapsed now
SWEEP = (
    _HELPERS
    + """
return sweep(ARGV[1], KEYS[1], now_ms(), tonumber(ARGV[2]))
"""
)

# KEYS: counter keys. -> {s1, r1, s2, r2, ...}
READ_COUNTERS = """
local out = {}
for i, key in ipairs(KEYS) do
  local v = redis.call('HMGET', key, 's', 'r')
  out[2 * i - 1] = tonumber(v[1]) or 0
  out[2 * i] = tonumber(v[2]) or 0
end
return out
"""

# KEYS: cfg keys. -> {per1, tz1, lim1, dis1, ...} ('' for absent)
READ_CONFIGS = """
local out = {}
for i, key in ipairs(KEYS) do
  local v = redis.call('HMGET', key, 'per', 'tz', 'lim', 'dis')
  for j = 1, 4 do out[4 * (i - 1) + j] = v[j] or '' end
end
return out
"""

# Writes one scope's configuration, keeping its disabled flag.
# KEYS: cfg, counter (or the cfg again when spend is not rebuilt)
# ARGV: limit ('' = unlimited), per, tz, spend to set (-1 = leave), counter expire-at
# -> the counter's settled spend before the write
SET_SCOPE = """
if ARGV[1] == '' then redis.call('HDEL', KEYS[1], 'lim') else redis.call('HSET', KEYS[1], 'lim', ARGV[1]) end
redis.call('HSET', KEYS[1], 'per', ARGV[2], 'tz', ARGV[3])
local before = 0
if ARGV[4] ~= '-1' then
  before = tonumber(redis.call('HGET', KEYS[2], 's')) or 0
  redis.call('HSET', KEYS[2], 's', ARGV[4])
  if ARGV[5] ~= '0' then redis.call('EXPIREAT', KEYS[2], ARGV[5]) end
end
return before
"""

# Rebuild of many scopes at once (reconcile).
# KEYS: cfg1, counter1, cfg2, counter2, ...
# ARGV: per scope 6 values: limit ('' = unlimited), per, tz, disabled ('1'/'0'), spend, counter expire-at
# -> {sum of |redis - database| of settled spend, scopes}
RECONCILE = """
local drift = 0
local n = #KEYS / 2
for i = 1, n do
  local c, k = KEYS[2 * i - 1], KEYS[2 * i]
  local a = 6 * (i - 1)
  redis.call('DEL', c)
  redis.call('HSET', c, 'per', ARGV[a + 2], 'tz', ARGV[a + 3])
  if ARGV[a + 1] ~= '' then redis.call('HSET', c, 'lim', ARGV[a + 1]) end
  if ARGV[a + 4] == '1' then redis.call('HSET', c, 'dis', '1') end
  local before = tonumber(redis.call('HGET', k, 's')) or 0
  local after = tonumber(ARGV[a + 5])
  drift = drift + math.abs(before - after)
  redis.call('HSET', k, 's', ARGV[a + 5])
  if ARGV[a + 6] ~= '0' then redis.call('EXPIREAT', k, ARGV[a + 6]) end
end
return {drift, n}
"""

# KEYS: loaded, provider hash. ARGV: marker value, provider hash expire-at, provider, spend, ...
FINISH_RECONCILE = """
redis.call('DEL', KEYS[2])
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
if ARGV[2] ~= '0' and #ARGV > 2 then redis.call('EXPIREAT', KEYS[2], ARGV[2]) end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""
