"""
The Redis engine's server-side scripts.

Everything that must happen together happens in one script, so it happens
entirely or not at all and no other client sees a half-done state: publishing
(history + cluster feed + idempotency key), recovering (epoch + retention
check + replay, one snapshot), and presence changes (membership + counts +
the joined/left notification on the feed).  Scripts only touch keys they are
given; argument layouts are documented above each.

Cursor format: C{<epoch>:<history stream id>}.  The epoch is a fresh random
token whenever a room's history is created, so a cursor from a history that
expired or was lost (a Redis restart without persistence) is never mistaken
for a position in the new one.
"""

from __future__ import annotations

from unrealon.engine.redisclient import LuaScript

_EPOCH = """
local function new_epoch()
  local t = redis.call('TIME')
  local n = redis.call('INCR', 'unrealon:epochs')
  return string.format('%x%x%x', tonumber(t[1]), tonumber(t[2]), n)
end
local function id_parts(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end
local function id_less(a, b)
  local am, as = id_parts(a)
  local bm, bs = id_parts(b)
  return am < bm or (am == bm and as < bs)
end
"""

#: KEYS: history stream, epoch key, feed stream, idempotency key ("" for none)
#: ARGV: head, tail, history size, history ttl (s), feed maxlen, idempotency ttl (s), room
#: The notification is head .. cursor .. tail; the server encoded head and tail.
#: Returns the cursor (the first one when the idempotency key was already used).
PUBLISH = LuaScript(
    _EPOCH
    + """
if KEYS[4] ~= '' then
  local done = redis.call('GET', KEYS[4])
  if done then return done end
end
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = new_epoch()
  redis.call('DEL', KEYS[1])
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'h', ARGV[1], 't', ARGV[2])
local ttl = tonumber(ARGV[4])
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('SET', KEYS[2], epoch, 'EX', ttl)
local cursor = epoch .. ':' .. id
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*',
           'k', 'e', 'r', ARGV[7], 'c', cursor, 'm', ARGV[1] .. cursor .. ARGV[2])
if KEYS[4] ~= '' then
  redis.call('SET', KEYS[4], cursor, 'EX', tonumber(ARGV[6]))
end
return cursor
"""
)

#: KEYS: history stream, epoch key
#: ARGV: since epoch ("" for none), since id, history size, history ttl (s)
#: Returns {epoch, last id, recovered (0/1), {message, ...}}.  A room with no
#: history gets an epoch (so its "start" cursor, <epoch>:0-0, stays valid).
RECOVER = LuaScript(
    _EPOCH
    + """
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = new_epoch()
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[2], epoch, 'EX', tonumber(ARGV[4]))
end
local last = '0-0'
local deleted = '0-0'
if redis.call('EXISTS', KEYS[1]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then last = info[i + 1] end
    if info[i] == 'max-deleted-entry-id' then deleted = info[i + 1] end
  end
end
if ARGV[1] == '' or ARGV[1] ~= epoch then
  return {epoch, last, 0, {}}
end
local since = ARGV[2]
if id_less(last, since) or id_less(since, deleted) then
  return {epoch, last, 0, {}}
end
local size = tonumber(ARGV[3])
local entries = redis.call('XRANGE', KEYS[1], '(' .. since, '+', 'COUNT', size + 1)
if #entries > size then
  return {epoch, last, 0, {}}
end
local missed = {}
for i, entry in ipairs(entries) do
  local fields = entry[2]
  local head, tail = '', ''
  for j = 1, #fields, 2 do
    if fields[j] == 'h' then head = fields[j + 1] end
    if fields[j] == 't' then tail = fields[j + 1] end
  end
  missed[i] = head .. epoch .. ':' .. entry[1] .. tail
end
return {epoch, last, 1, missed}
"""
)

#: KEYS: feed stream
#: ARGV: feed maxlen, then field/value pairs
#: Appends a non-history message (ephemeral presence event, disconnect order).
FEED = LuaScript(
    """
local args = {'XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*'}
for i = 2, #ARGV do args[#args + 1] = ARGV[i] end
return redis.call(unpack(args))
"""
)

_PRESENCE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function announce(feed, maxlen, room, message, user)
  if message ~= '' then
    redis.call('XADD', feed, 'MAXLEN', '~', maxlen, '*', 'k', 'p', 'r', room, 'm', message, 'x', user)
  end
end
"""

#: KEYS: members zset, user counts hash, info hash, rooms set, feed
#: ARGV: room, user, member (user|conn), lifetime (ms), info json,
#:       joined message ("" for none), feed maxlen
#: Adds a connection; the user's first connection announces presence.joined.
#: Expiry times come from Redis' clock, so nodes' clocks need not agree.
PRESENCE_JOIN = LuaScript(
    _PRESENCE
    + """
if redis.call('ZADD', KEYS[1], now_ms() + tonumber(ARGV[4]), ARGV[3]) == 1 then
  redis.call('SADD', KEYS[4], ARGV[1])
  redis.call('HSET', KEYS[3], ARGV[2], ARGV[5])
  if redis.call('HINCRBY', KEYS[2], ARGV[2], 1) == 1 then
    announce(KEYS[5], ARGV[7], ARGV[1], ARGV[6], ARGV[2])
    return 1
  end
end
return 0
"""
)

#: KEYS: members zset, user counts hash, info hash, feed
#: ARGV: room, user, member, left message ("" for none), feed maxlen
#: Removes a connection; the user's last connection announces presence.left.
PRESENCE_LEAVE = LuaScript(
    _PRESENCE
    + """
if redis.call('ZREM', KEYS[1], ARGV[3]) == 1 then
  if redis.call('HINCRBY', KEYS[2], ARGV[2], -1) <= 0 then
    redis.call('HDEL', KEYS[2], ARGV[2])
    redis.call('HDEL', KEYS[3], ARGV[2])
    announce(KEYS[4], ARGV[5], ARGV[1], ARGV[4], ARGV[2])
    return 1
  end
end
return 0
"""
)

#: KEYS: none
#: ARGV: key prefix, lifetime (ms), then room/member pairs
#: Pushes the expiry of this node's live connections (only those still present).
PRESENCE_HEARTBEAT = LuaScript(
    _PRESENCE
    + """
local prefix, expires = ARGV[1], now_ms() + tonumber(ARGV[2])
for i = 3, #ARGV, 2 do
  redis.call('ZADD', prefix .. ARGV[i] .. ':m', 'XX', expires, ARGV[i + 1])
end
return 1
"""
)

#: KEYS: sweeper lock
#: ARGV: key prefix, (unused), lock token, lock ttl (ms), feed, feed maxlen
#: The cluster's one expiry sweep: only the lock holder sweeps.  Removes
#: expired connections of every room and announces presence.left for users
#: with none left.  The left notification is built here (JSON-escaped by
#: cjson) because the node that wrote the entry is gone.
PRESENCE_SWEEP = LuaScript(
    _PRESENCE
    + """
local prefix, now = ARGV[1], now_ms()
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[3] then return -1 end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
local rooms = redis.call('SMEMBERS', prefix .. 'rooms')
local removed = 0
for _, room in ipairs(rooms) do
  local zkey = prefix .. room .. ':m'
  local ukey = prefix .. room .. ':u'
  local ikey = prefix .. room .. ':i'
  local expired = redis.call('ZRANGEBYSCORE', zkey, '-inf', now)
  for _, member in ipairs(expired) do
    redis.call('ZREM', zkey, member)
    removed = removed + 1
    local bar = string.find(member, '|', 1, true)
    local user = string.sub(member, 1, bar - 1)
    if redis.call('HINCRBY', ukey, user, -1) <= 0 then
      redis.call('HDEL', ukey, user)
      redis.call('HDEL', ikey, user)
      if string.sub(room, 1, 2) ~= '__' then
        local message = cjson.encode({jsonrpc = '2.0', method = 'presence.left',
                                      params = {room = room, user_id = user}})
        redis.call('XADD', ARGV[5], 'MAXLEN', '~', ARGV[6], '*',
                   'k', 'p', 'r', room, 'm', message, 'x', user)
      end
    end
  end
  if redis.call('ZCARD', zkey) == 0 then
    redis.call('DEL', zkey, ukey, ikey)
    redis.call('SREM', prefix .. 'rooms', room)
  end
end
return removed
"""
)

#: KEYS: members zset, info hash
#: ARGV: none
#: Live connections of a room: {member, info-json-or-false, ...} (Redis' clock).
PRESENCE_LIST = LuaScript(
    _PRESENCE
    + """
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now_ms(), '+inf')
local out = {}
for _, member in ipairs(members) do
  local bar = string.find(member, '|', 1, true)
  local user = string.sub(member, 1, bar - 1)
  out[#out + 1] = member
  out[#out + 1] = redis.call('HGET', KEYS[2], user) or ''
end
return out
"""
)
