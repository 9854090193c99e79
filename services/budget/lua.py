"""The Lua scripts of the budget store. Every key a script touches starts with the one hash tag
`{tally:budget}`, so on a Redis Cluster they all live in one slot and each script is atomic.

Layout (P = "{tally:budget}:"):
  P loaded                        set by a reconcile ("<Redis run id>|<time>"); absent after
                                  FLUSHALL -> scripts answer NOT_LOADED; another run id -> Redis
                                  restarted since (from an append-only file that may lack the
                                  last second of writes): the budget service rebuilds
  P cfg:<scope>                   hash: per, tz (the period), lim (micro-units; absent = unlimited), dis ("1")
  P disabled                      set: the scopes whose cfg has dis (so a sync finds one left disabled)
  P c:<scope>:<per>:<tz>:<epoch>  hash: s (settled spend), r (open reservations), micro-units
  P r:<request id>                hash: st (o open, s settled, r released, x expired), k, a, c1, c2, x
  P rexp                          sorted set of open reservations by expiry (ms)
  P p:<per>:<tz>:<epoch>          hash: provider -> settled spend in the global period
  P h:<unix hour>                 set: request ids ingest handed over with no record (SETTLE_HANDOFF)
  P hd:<hand-off id>:<chunk>      a SETTLE_HANDOFF chunk applied
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
local function run_id()
  return string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
end
local function expire_at(key, at)
  if at ~= '0' then redis.call('EXPIREAT', key, at) end
end
-- A PostgreSQL snapshot (pg_current_snapshot() as text, "xmin:xmax:xip,xip,...") as
-- {xmin, xmax, set of in-progress xids}; nil for none.
local function parse_snap(text)
  if not text then return nil end
  local xmin, xmax, xip = string.match(text, '^(%d+):(%d+):(.*)$')
  if not xmin then return nil end
  local running = {}
  for x in string.gmatch(xip, '%d+') do running[x] = true end
  return {tonumber(xmin), tonumber(xmax), running}
end
-- Whether the transaction `xid` (text; '0' = unknown) had committed in the snapshot, so that
-- sums read in it include its rows.
local function visible(snap, xid)
  if not snap or xid == '0' then return false end
  local x = tonumber(xid)
  if x < snap[1] then return true end
  if x >= snap[2] then return false end
  return not snap[3][xid]
end
-- A settlement logged while a rebuild runs: "xid|amount|key counter|global counter|provider hash|provider".
local function parse_logged(entry)
  return string.match(entry, '^(%d+)|(%-?%d+)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
end
"""

# The request-path scripts take many items per call (concurrent Authorize calls coalesced, see
# `services.budget.batching`; SettleBatch chunks), so one round trip and one script run serve
# them all. Each item is still decided atomically: a script runs alone, items in order.
# Keys are declared once in KEYS (KEYS[3..]) and items refer to them by index, because most
# items share their config and counter keys; configs are read once per run (`cfgc`). The items
# travel as one JSON argument (decoded by Redis' built-in cjson): packing one string per batch
# costs the client far less than a dozen arguments per item. Amounts and expiry times are JSON
# strings (a Lua number would print 1e15 as "1e+15"); key indexes are numbers.
_BATCH_HELPERS = """
local cfg_cache = {}
local function cfgc(key, dper, dtz)
  local c = cfg_cache[key]
  if not c then
    local per, tz, lim, dis = cfg(key, dper, dtz)
    c = {per, tz, lim, dis}
    cfg_cache[key] = c
  end
  return c[1], c[2], c[3], c[4]
end
"""

# Whether `rid` was handed over by SETTLE_HANDOFF with no reservation record, in this hour or the
# last (`hprefix` .. unix hour: a set of request ids, kept until the end of the next hour).
_HANDED_OVER = """
local function handed_over(hprefix, rid)
  local hour = math.floor(now_ms() / 3600000)
  return redis.call('SISMEMBER', hprefix .. hour, rid) == 1
    or redis.call('SISMEMBER', hprefix .. (hour - 1), rid) == 1
end
"""

# Authorize many items.
# KEYS: loaded, rexp, then the key table (config, counter and reservation keys)
# ARGV: default per, default tz, reservation key prefix, sweep limit per item, ttl ms,
#       reservation key ttl ms, items (JSON array of arrays of 14 values: request id, key id,
#       estimate, key cfg #, global cfg #, key counter #, global counter #, reservation #,
#       key per, key tz, global per, global tz, key counter expire-at, global counter expire-at;
#       # = index into KEYS)
# -> {0} not loaded | {1, item...} where item is
#    {1, kper, ktz, gper, gtz} stale config |
#    {2, reason, klim, kcommitted, glim, gcommitted} denied (1 disabled, 2 key, 3 global) |
#    {3, expires ms, klim, kcommitted, glim, gcommitted, replayed}
AUTHORIZE = (
    _HELPERS
    + _BATCH_HELPERS
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local dper, dtz = ARGV[1], ARGV[2]
local items = cjson.decode(ARGV[7])
local now = now_ms()
sweep(ARGV[3], KEYS[2], now, tonumber(ARGV[4]) * #items)
local ttl, record_ttl = tonumber(ARGV[5]), ARGV[6]
local out = {1}
for i, it in ipairs(items) do
  local kc, gc, rk = KEYS[it[6]], KEYS[it[7]], KEYS[it[8]]
  local kper, ktz, klim, kdis = cfgc(KEYS[it[4]], dper, dtz)
  local gper, gtz, glim = cfgc(KEYS[it[5]], dper, dtz)
  local res
  if kper ~= it[9] or ktz ~= it[10] or gper ~= it[11] or gtz ~= it[12] then
    res = {1, kper, ktz, gper, gtz}
  else
    local prior = redis.call('HMGET', rk, 'st', 'x')
    local ks, kr = counters(kc)
    local gs, gr = counters(gc)
    local amount = it[3]
    local est = tonumber(amount)
    if prior[1] then
      res = {3, tonumber(prior[2]) or 0, klim, ks + kr, glim, gs + gr, 1}
    elseif kdis then
      res = {2, 1, klim, ks + kr, glim, gs + gr}
    elseif klim >= 0 and ks + kr + est > klim then
      res = {2, 2, klim, ks + kr, glim, gs + gr}
    elseif glim >= 0 and gs + gr + est > glim then
      res = {2, 3, klim, ks + kr, glim, gs + gr}
    else
      local exp = now + ttl
      redis.call('HINCRBY', kc, 'r', amount)
      redis.call('HINCRBY', gc, 'r', amount)
      expire_at(kc, it[13])
      expire_at(gc, it[14])
      redis.call('HSET', rk, 'st', 'o', 'k', it[2], 'a', amount, 'c1', kc, 'c2', gc, 'x', exp)
      redis.call('PEXPIRE', rk, record_ttl)
      redis.call('ZADD', KEYS[2], exp, it[1])
      res = {3, exp, klim, ks + kr + est, glim, gs + gr + est, 0}
    end
  end
  out[i + 1] = res
end
return out
"""
)

# Settle many items.
# KEYS: loaded, rexp, rebuild, rebuild log, then the key table (config, counter, reservation and
#       provider keys)
# ARGV: default per, default tz, settled marker ttl ms, items (JSON array of arrays of 17 values:
#       request id, key id, actual, key cfg #, global cfg #, key counter #, global counter #,
#       reservation #, provider hash #, key per, key tz, global per, global tz,
#       key counter expire-at, global counter expire-at, provider, database transaction id),
#       the prefix of SETTLE_HANDOFF's sets (a request with no record that is in one was handed
#       over by ingest already: already settled)
# Counter rebuilds (RECONCILE) read the database in one snapshot, kept in `rebuild`: the spend of
# a transaction visible in it is already in the rebuilt global and provider counters and in the
# counters of the keys rebuilt (those with a budget, or disabled), so it is not added again
# (ingest hands spend over after its commit, so it can arrive after the rebuild that counted it).
# While a rebuild runs, every settlement it may not have counted is logged, so the rebuild adds
# what arrived between its snapshot and its rewrite of each counter.
# -> {0} not loaded | {1, item...} where item is
#    {1, kper, ktz, gper, gtz} stale | {2, klim, ks, kr, glim, gs, gr} already settled |
#    {3, overspend, klim, ks, kr, glim, gs, gr, ks before, gs before, had reservation (1/0)}
SETTLE = (
    _HELPERS
    + _BATCH_HELPERS
    + _HANDED_OVER
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local dper, dtz, settled_ttl = ARGV[1], ARGV[2], ARGV[3]
local items = cjson.decode(ARGV[4])
local rb = redis.call('HMGET', KEYS[3], 'until', 'snap')
local snap = parse_snap(rb[2])
local logging = rb[1] and tonumber(rb[1]) > now_ms()
local out = {1}
for i, it in ipairs(items) do
  local kc, gc, rk, ph = KEYS[it[6]], KEYS[it[7]], KEYS[it[8]], KEYS[it[9]]
  local kper, ktz, klim, kdis = cfgc(KEYS[it[4]], dper, dtz)
  local gper, gtz, glim = cfgc(KEYS[it[5]], dper, dtz)
  local res
  if kper ~= it[10] or ktz ~= it[11] or gper ~= it[12] or gtz ~= it[13] then
    res = {1, kper, ktz, gper, gtz}
  else
    local r = redis.call('HMGET', rk, 'st', 'a', 'c1', 'c2')
    if r[1] == 's' or (not r[1] and handed_over(ARGV[5], it[1])) then
      local ks, kr = counters(kc)
      local gs, gr = counters(gc)
      res = {2, klim, ks, kr, glim, gs, gr}
    else
      local amount = it[3]
      local actual = tonumber(amount)
      local reserved, held = 0, 0
      if r[1] == 'o' then
        held = 1
        reserved = tonumber(r[2])
        redis.call('HINCRBY', r[3], 'r', -reserved)
        redis.call('HINCRBY', r[4], 'r', -reserved)
        redis.call('ZREM', KEYS[2], it[1])
      end
      local over = 0
      if actual > reserved then over = actual - reserved end
      local kb = counters(kc)
      local gb = counters(gc)
      local xid = it[17]
      local counted = visible(snap, xid)
      if not counted or not (klim >= 0 or kdis) then redis.call('HINCRBY', kc, 's', amount) end
      if not counted then
        redis.call('HINCRBY', gc, 's', amount)
        if it[16] ~= '' then redis.call('HINCRBY', ph, it[16], amount) end
        if logging then
          redis.call('RPUSH', KEYS[4], xid .. '|' .. amount .. '|' .. kc .. '|' .. gc .. '|' .. ph .. '|' .. it[16])
        end
      end
      expire_at(kc, it[14])
      expire_at(gc, it[15])
      if it[16] ~= '' then expire_at(ph, it[15]) end
      redis.call('HSET', rk, 'st', 's', 'k', it[2], 'a', amount)
      if r[1] then redis.call('HDEL', rk, 'c1', 'c2', 'x') end
      redis.call('PEXPIRE', rk, settled_ttl)
      local ks, kr = counters(kc)
      local gs, gr = counters(gc)
      res = {3, over, klim, ks, kr, glim, gs, gr, kb, gb, held}
    end
  end
  out[i + 1] = res
end
return out
"""
)

# Settle a batch of usage (SettleBatch: the ingest hand-off after each commit, thousands of
# items). Same decisions as SETTLE, item by item in order, but the counters are touched once per
# distinct counter, not per item, and the reply is the batch's totals and each counter's state,
# not one answer per item. Items share a few counter groups:
# KEYS: loaded, rexp, rebuild, rebuild log, then the key table (config, counter and provider keys)
# ARGV: default per, default tz, settled marker ttl ms, reservation key prefix, settled marker ttl
#       ms of an item with no reservation record (its request was never authorized),
#       key groups (JSON: key id, key cfg #, key counter #, key per, key tz, counter expire-at),
#       global groups (JSON: global cfg #, global counter #, provider hash #, per, tz, expire-at),
#       items (JSON: request id, actual, key group #, global group #, provider, transaction id)
# Nothing is written when a group's period is not its scope's any more (stale).
# -> {0} not loaded | {1, {cfg key, per, tz}...} stale |
#    {2, already settled, settled, overspend with no open reservation, overspend above open
#     reservations, items settled above an open reservation, the first of their request ids,
#     {klim, ks, kr} per key group, {glim, gs, gr} per global group}
# The parts SETTLE_SPEND and SETTLE_HANDOFF share. Before _SPEND_BEGIN: dper, dtz, kgroups (key
# id, key cfg #, key counter #, per, tz, counter expire-at) and ggroups (global cfg #, global
# counter #, provider hash #, per, tz, expire-at). _SPEND_BEGIN returns the stale groups, if any
# (nothing written), and defines `add_spend`, which books settled spend on a key group and a
# global group (once per distinct counter at the end, in _SPEND_END, which returns the totals).
_SPEND_BEGIN = """
local stale, klim, kcap, glim = {}, {}, {}, {}
for i, g in ipairs(kgroups) do
  local per, tz, lim, dis = cfgc(KEYS[g[2]], dper, dtz)
  if per ~= g[4] or tz ~= g[5] then stale[#stale + 1] = {KEYS[g[2]], per, tz} end
  klim[i] = lim
  kcap[i] = lim >= 0 or dis  -- a counter a rebuild rewrites
end
for i, g in ipairs(ggroups) do
  local per, tz, lim = cfgc(KEYS[g[1]], dper, dtz)
  if per ~= g[4] or tz ~= g[5] then stale[#stale + 1] = {KEYS[g[1]], per, tz} end
  glim[i] = lim
end
if #stale > 0 then return {1, unpack(stale)} end
local rb = redis.call('HMGET', KEYS[3], 'until', 'snap')
local snap = parse_snap(rb[2])
local logging = rb[1] and tonumber(rb[1]) > now_ms()
local kadd, gadd, padd, logged = {}, {}, {}, {}
local function add_spend(ki, gi, provider, xid, actual)
  local counted = visible(snap, xid)
  if not counted or not kcap[ki] then kadd[ki] = (kadd[ki] or 0) + actual end
  if not counted then
    gadd[gi] = (gadd[gi] or 0) + actual
    local pk = gi .. '|' .. provider
    padd[pk] = (padd[pk] or 0) + actual
    if logging then
      local lk = xid .. '|' .. ki .. '|' .. gi .. '|' .. provider
      logged[lk] = (logged[lk] or 0) + actual
    end
  end
end
local already, settled, over_none, over_open, open_n, first_open = 0, 0, 0, 0, 0, ''
-- Gives back the open reservation of request `rid` (`r`: its record's st, a, c1, c2) and books
-- the actual cost above it as overspend; spend with no open reservation is all overspend.
local function close_reservation(rid, r, actual)
  if r[1] == 'o' then
    local reserved = tonumber(r[2])
    redis.call('HINCRBY', r[3], 'r', -reserved)
    redis.call('HINCRBY', r[4], 'r', -reserved)
    redis.call('ZREM', KEYS[2], rid)
    if actual > reserved then
      over_open = over_open + actual - reserved
      open_n = open_n + 1
      if first_open == '' then first_open = rid end
    end
  elseif actual > 0 then
    over_none = over_none + actual
  end
end
"""
_SPEND_END = """
local function int(n) return string.format('%.0f', n) end
for ki, amount in pairs(kadd) do redis.call('HINCRBY', KEYS[kgroups[ki][3]], 's', int(amount)) end
for gi, amount in pairs(gadd) do redis.call('HINCRBY', KEYS[ggroups[gi][2]], 's', int(amount)) end
for pk, amount in pairs(padd) do
  local gi, provider = string.match(pk, '^(%d+)|(.*)$')
  redis.call('HINCRBY', KEYS[ggroups[tonumber(gi)][3]], provider, int(amount))
end
for lk, amount in pairs(logged) do
  local xid, ki, gi, provider = string.match(lk, '^(%d+)|(%d+)|(%d+)|(.*)$')
  local kg, gg = kgroups[tonumber(ki)], ggroups[tonumber(gi)]
  local entry = {xid, int(amount), KEYS[kg[3]], KEYS[gg[2]], KEYS[gg[3]], provider}
  redis.call('RPUSH', KEYS[4], table.concat(entry, '|'))
end
local kout, gout = {}, {}
for i, g in ipairs(kgroups) do
  expire_at(KEYS[g[3]], g[6])
  local ks, kr = counters(KEYS[g[3]])
  kout[i] = {klim[i], ks, kr}
end
for i, g in ipairs(ggroups) do
  expire_at(KEYS[g[2]], g[6])
  expire_at(KEYS[g[3]], g[6])
  local gs, gr = counters(KEYS[g[2]])
  gout[i] = {glim[i], gs, gr}
end
return {2, already, settled, over_none, over_open, open_n, first_open, kout, gout}
"""
# Settle a batch of usage given as items (SettleBatch's `items`). Same decisions as SETTLE, item
# by item in order, but the counters are touched once per distinct counter, not per item, and
# the reply is the batch's totals and each counter's state, not one answer per item. Items share
# a few counter groups:
# KEYS: loaded, rexp, rebuild, rebuild log, then the key table (config, counter and provider keys)
# ARGV: default per, default tz, settled marker ttl ms, reservation key prefix, settled marker ttl
#       ms of an item with no reservation record (its request was never authorized),
#       key groups (JSON: key id, key cfg #, key counter #, key per, key tz, counter expire-at),
#       global groups (JSON: global cfg #, global counter #, provider hash #, per, tz, expire-at),
#       items (JSON: request id, actual, key group #, global group #, provider, transaction id),
#       the prefix of SETTLE_HANDOFF's sets of request ids handed over with no record
# Nothing is written when a group's period is not its scope's any more (stale).
# -> {0} not loaded | {1, {cfg key, per, tz}...} stale |
#    {2, already settled, settled, overspend with no open reservation, overspend above open
#     reservations, items settled above an open reservation, the first of their request ids,
#     {klim, ks, kr} per key group, {glim, gs, gr} per global group}
SETTLE_SPEND = (
    _HELPERS
    + _BATCH_HELPERS
    + _HANDED_OVER
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local dper, dtz, settled_ttl, prefix, bare_ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local kgroups, ggroups, items = cjson.decode(ARGV[6]), cjson.decode(ARGV[7]), cjson.decode(ARGV[8])
"""
    + _SPEND_BEGIN
    + """
for _, it in ipairs(items) do
  local rid, actual, ki, gi = it[1], tonumber(it[2]), it[3], it[4]
  local rk = prefix .. rid
  local r = redis.call('HMGET', rk, 'st', 'a', 'c1', 'c2')
  if r[1] == 's' or (not r[1] and handed_over(ARGV[9], rid)) then
    already = already + 1
  else
    settled = settled + 1
    close_reservation(rid, r, actual)
    add_spend(ki, gi, it[5], it[6], actual)
    redis.call('HSET', rk, 'st', 's', 'k', kgroups[ki][1], 'a', it[2])
    if r[1] then
      redis.call('HDEL', rk, 'c1', 'c2', 'x')
      redis.call('PEXPIRE', rk, settled_ttl)
    else
      redis.call('PEXPIRE', rk, bare_ttl)
    end
  end
end
"""
    + _SPEND_END
)

# Settle ingest's hand-off (SettleBatch's compact form): the requests of a few spend groups (a
# key, a provider, a transaction and a quarter hour each). A request with a record (a
# reservation, or a direct Settle before) is settled as SETTLE_SPEND settles it; a request with
# none (never authorized) adds its spend and is only remembered in the hour's set of request ids
# handed over (for a later direct Settle of it; see _HANDED_OVER) instead of getting a record of
# its own: a set member costs Redis a fraction of a key with an expiry, in memory and in time.
# Ingest hands each stored request over once, so after this the only thing left to recognise is
# a late direct Settle: a record this settles, or finds settled by a direct Settle (which kept it
# for days, waiting for this hand-off), is kept only `remember` ms from now (as long as the set).
# A chunk already applied (its marker `done`, also kept `remember` ms, exists) changes nothing.
# KEYS: loaded, rexp, rebuild, rebuild log, then the key table (config, counter and provider keys)
# ARGV: default per, default tz, remember ms, reservation key prefix, prefix of the hand-off
#       sets, this chunk's done marker, key groups and global groups (JSON, as SETTLE_SPEND),
#       spend groups (JSON: key group #, global group #, provider, transaction id), items (JSON:
#       three columns: request ids, actuals (numbers), spend group #s 0-based)
# -> as SETTLE_SPEND, or {3} when the chunk had been applied before
SETTLE_HANDOFF = (
    _HELPERS
    + _BATCH_HELPERS
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local dper, dtz, remember, prefix, hprefix = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local kgroups, ggroups = cjson.decode(ARGV[7]), cjson.decode(ARGV[8])
"""
    + _SPEND_BEGIN
    + """
if not redis.call('SET', ARGV[6], '1', 'NX', 'PX', remember) then return {3} end
local sgroups, columns = cjson.decode(ARGV[9]), cjson.decode(ARGV[10])
local rids, actuals, sis = columns[1], columns[2], columns[3]
local sadd, bare, nbare = {}, {}, 0
-- One EXISTS over every item's record first: usually no item has one (its request was never
-- authorized nor settled directly), and then none needs a lookup of its own.
local rkeys = {}
for i = 1, #rids do rkeys[i] = prefix .. rids[i] end
local any = #rkeys > 0 and redis.call('EXISTS', unpack(rkeys)) > 0
local none = {false, false, false, false}
for i = 1, #rids do
  local rid, actual, si = rids[i], actuals[i], sis[i] + 1
  local rk = rkeys[i]
  local r = none
  if any then r = redis.call('HMGET', rk, 'st', 'a', 'c1', 'c2') end
  if r[1] == 's' then
    already = already + 1
    redis.call('PEXPIRE', rk, remember, 'LT')
  else
    settled = settled + 1
    sadd[si] = (sadd[si] or 0) + actual
    close_reservation(rid, r, actual)
    if not r[1] then
      nbare = nbare + 1
      bare[nbare] = rid
    else
      local g = sgroups[si]
      redis.call('HSET', rk, 'st', 's', 'k', kgroups[g[1]][1], 'a', string.format('%.0f', actual))
      redis.call('HDEL', rk, 'c1', 'c2', 'x')
      redis.call('PEXPIRE', rk, remember)
    end
  end
end
if #bare > 0 then
  local hour = math.floor(now_ms() / 3600000)
  local hk = hprefix .. hour
  for i = 1, #bare, 1000 do redis.call('SADD', hk, unpack(bare, i, math.min(i + 999, #bare))) end
  redis.call('EXPIREAT', hk, (hour + 2) * 3600)
end
for si, amount in pairs(sadd) do
  local g = sgroups[si]
  add_spend(g[1], g[2], g[3], g[4], amount)
end
"""
    + _SPEND_END
)

# KEYS: reservation keys. -> the key id of each reservation ('' when there is none)
RESERVATION_KEY_IDS = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HGET', key, 'k') or '' end
return out
"""

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
# KEYS: rebuild, rebuild log, disabled scopes, cfg1, counter1, cfg2, counter2, ...
# ARGV: the snapshot, then per scope 6 values: limit ('' = unlimited), per, tz, disabled ('1'/'0'),
# spend, counter expire-at
# -> {sum of |redis - database| of settled spend, scopes}
RECONCILE = (
    _HELPERS
    + """
-- KEYS: rebuild, rebuild log, disabled scopes, then (config, counter) pairs. ARGV: the rebuild's
-- snapshot, then 6 per pair: limit, per, tz, disabled, spend in the snapshot, counter expire-at.
-- A counter becomes its spend in the snapshot plus what was settled since that the snapshot
-- does not hold (logged by SETTLE). From here on, SETTLE adds nothing the snapshot holds.
redis.call('HSET', KEYS[1], 'snap', ARGV[1])
local snap = parse_snap(ARGV[1])
local extra = {}
for _, entry in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  local xid, amount, kc, gc = parse_logged(entry)
  if xid and not visible(snap, xid) then
    extra[kc] = (extra[kc] or 0) + tonumber(amount)
    extra[gc] = (extra[gc] or 0) + tonumber(amount)
  end
end
local drift = 0
local n = (#KEYS - 3) / 2
for i = 1, n do
  local c, k = KEYS[2 * i + 2], KEYS[2 * i + 3]
  local a = 1 + 6 * (i - 1)
  redis.call('DEL', c)
  redis.call('HSET', c, 'per', ARGV[a + 2], 'tz', ARGV[a + 3])
  if ARGV[a + 1] ~= '' then redis.call('HSET', c, 'lim', ARGV[a + 1]) end
  local scope = string.match(c, 'cfg:(.*)$')
  if ARGV[a + 4] == '1' then
    redis.call('HSET', c, 'dis', '1')
    redis.call('SADD', KEYS[3], scope)
  else
    redis.call('SREM', KEYS[3], scope)
  end
  local before = tonumber(redis.call('HGET', k, 's')) or 0
  local after = tonumber(ARGV[a + 5]) + (extra[k] or 0)
  drift = drift + math.abs(before - after)
  redis.call('HSET', k, 's', string.format('%d', after))
  if ARGV[a + 6] ~= '0' then redis.call('EXPIREAT', k, ARGV[a + 6]) end
end
return {drift, n}
"""
)

# KEYS: loaded, provider hash, rebuild, rebuild log.
# ARGV: marker value, provider hash expire-at, the rebuild's snapshot, then provider, spend, ...
# The provider hash becomes its spend in the snapshot plus what was settled since that the
# snapshot does not hold; the rebuild ends (SETTLE stops logging).
FINISH_RECONCILE = (
    _HELPERS
    + """
local snap = parse_snap(ARGV[3])
redis.call('DEL', KEYS[2])
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
for _, entry in ipairs(redis.call('LRANGE', KEYS[4], 0, -1)) do
  local xid, amount, _, _, ph, provider = parse_logged(entry)
  if xid and ph == KEYS[2] and provider ~= '' and not visible(snap, xid) then
    redis.call('HINCRBY', KEYS[2], provider, amount)
  end
end
if ARGV[2] ~= '0' and redis.call('EXISTS', KEYS[2]) == 1 then redis.call('EXPIREAT', KEYS[2], ARGV[2]) end
redis.call('HDEL', KEYS[3], 'until')
redis.call('DEL', KEYS[4])
redis.call('SET', KEYS[1], run_id() .. '|' .. ARGV[1])
return 1
"""
)

# KEYS: loaded. -> 1 when the counters were loaded into another Redis process than this one (it
# restarted since, or failed over), else 0 (loaded here, or not loaded at all).
LOADED_ELSEWHERE = (
    _HELPERS
    + """
local loaded = redis.call('GET', KEYS[1])
if not loaded then return 0 end
local run = run_id()
if string.sub(loaded, 1, #run + 1) == run .. '|' then return 0 end
return 1
"""
)

# KEYS: rebuild, rebuild log. ARGV: until (ms). A rebuild starts: SETTLE logs until it ends or `until`.
BEGIN_REBUILD = """
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'until', ARGV[1])
return 1
"""

# KEYS: the scope's config, the disabled scopes. ARGV: '1' (disable) or '0', the scope.
SET_DISABLED = """
if ARGV[1] == '1' then
  redis.call('HSET', KEYS[1], 'dis', '1')
  redis.call('SADD', KEYS[2], ARGV[2])
else
  redis.call('HDEL', KEYS[1], 'dis')
  redis.call('SREM', KEYS[2], ARGV[2])
end
return 1
"""
