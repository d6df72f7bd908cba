"""
The Redis engine's scripts for streamed messages (PROTOCOL.md section 5.1).

A streamed message (an AI answer published chunk by chunk) lives in four
keys of its own (L{unrealon.engine.rediskeys.message_keys}): a state hash
(the next C{seq} expected, its latest history entry, its fields, done,
error, gaps), its text so far (APPENDed), an index stream of its deliveries
(one entry per event, at the same id as that event's history entry: the
first C{seq} it covered and the text offset it started at), and the chunks
held back while an earlier one is missing.

The room's history holds one entry per message, a marker at the position of
the message's latest event: each delivery adds a new marker and deletes the
previous one.  So a message counts once toward C{UNREALON_HISTORY_SIZE}, and
a recovery from any cursor finds, in the index, the first delivery after it
and so the text the client lacks: one event per message, built here.

Ordering is done here too, because chunks of one message may be handled by
different nodes in any order: a chunk is delivered when its C{seq} is the
next one (with the held chunks that follow it), held otherwise, and ignored
when seen before.  Held chunks are released, with the missing ones reported
in C{gaps}, by L{CHUNK} in release mode once the gap wait is over; nodes find
the messages that are due with L{HELD_DUE}.
"""

from __future__ import annotations

from unrealon.engine.redisclient import LuaScript
from unrealon.engine.scripts import EPOCH_LIB, MESSAGES_LIB, ROOM_CHANNEL_LIB

#: KEYS: history stream, epoch key, message state, text, index, held
#:       chunks, held zset, the room's streaming set
#: ARGV: room, message id, seq (-1: release the held chunks if they are due),
#:       content, done ("1"/"0"), error ("" for none, else "e" .. text),
#:       notification head (up to the cursor), data fields without the
#:       closing brace, history size, history ttl (s), the room's channel, gap wait (ms)
#: Returns {the room's latest cursor, outcome}: delivered, held, ignored
#: (repeated, late, after done), released (held chunks let go after the
#: wait), none (a release with nothing due).
CHUNK = LuaScript(
    EPOCH_LIB
    + ROOM_CHANNEL_LIB
    + MESSAGES_LIB
    + """
-- Redis' clock in ms, read only when a chunk is held or released
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local room, mid = ARGV[1], ARGV[2]
local member = room .. '\\n' .. mid
local ttl = tonumber(ARGV[10])
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = new_epoch()
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[2], epoch, 'EX', ttl)
end
local function latest()
  local e = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  if #e > 0 then return epoch .. ':' .. e[1][1] end
  return epoch .. ':0-0'
end
-- the message's keys live as long as the history (their TTL), refreshed on
-- its first event, its last, and every 32 chunks in between: not on every
-- chunk, which would be most of a chunk's cost
local function refresh(first, last, done)
  if done or math.floor(last / 32) ~= math.floor((first - 1) / 32) then
    for i = 3, 5 do redis.call('EXPIRE', KEYS[i], ttl) end
    redis.call('EXPIRE', KEYS[8], ttl)
  end
end
local function settle()
  redis.call('HDEL', KEYS[3], 'deadline')
  redis.call('ZREM', KEYS[7], member)
end
local state = redis.call('HMGET', KEYS[3], 'next', 'done', 'deadline', 'marker', 'head',
                         'meta', 'gaps')
local seq = tonumber(ARGV[3])
if state[2] == '1' then return {latest(), 'ignored'} end
if not state[1] then
  if seq < 0 then
    settle()
    return {latest(), 'none'}
  end
  redis.call('HSET', KEYS[3], 'next', 0, 'head', ARGV[7], 'meta', ARGV[8])
  redis.call('SADD', KEYS[8], mid)
  state[5], state[6] = ARGV[7], ARGV[8]
end
local nxt = tonumber(state[1] or '0')

-- one event: append the text, move the marker, index it, announce it
local function deliver(first, last, content, done, err, gap)
  local offset
  if content ~= '' then
    offset = redis.call('APPEND', KEYS[4], content) - string.len(content)
  else
    offset = redis.call('STRLEN', KEYS[4])
  end
  local previous = last_entry(KEYS[1])
  local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', tonumber(ARGV[9]) + 1, '*', 'm', mid)
  redis.call('XADD', KEYS[5], id, 's', first, 'o', offset)
  if state[4] then redis.call('XDEL', KEYS[1], state[4]) end
  local fields = {'marker', id, 'next', last + 1}
  if done then
    fields[#fields + 1] = 'done'
    fields[#fields + 1] = '1'
  end
  if err then
    fields[#fields + 1] = 'error'
    fields[#fields + 1] = err
  end
  local gaps = state[7]
  if gap ~= '' then
    if gaps and gaps ~= '' then gaps = gaps .. ',' .. gap else gaps = gap end
    fields[#fields + 1] = 'gaps'
    fields[#fields + 1] = gaps
  end
  redis.call('HSET', KEYS[3], unpack(fields))
  local cursor = epoch .. ':' .. id
  local message = message_event(state[5], state[6], cursor, content, first, last, done, err,
                                gaps_json(gaps, first, last))
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('SET', KEYS[2], epoch, 'EX', ttl)
  announce_event(ARGV[11], previous, cursor, message)
  if done then
    -- a finished message is recovered whole: its delivery index (most of
    -- its memory) is no longer read, and its text is written once more at
    -- its exact size (APPEND over-allocates)
    redis.call('DEL', KEYS[5])
    redis.call('SET', KEYS[4], redis.call('GET', KEYS[4]) or '')
    redis.call('SREM', KEYS[8], mid)
    redis.call('DEL', KEYS[6])
    settle()
  end
  refresh(first, last, done)
  return cursor
end
local function held(s)
  local h = redis.call('HGET', KEYS[6], fmt(s))
  if not h then return nil end
  local c = cjson.decode(h)
  local err = nil
  if c[3] ~= '' then err = string.sub(c[3], 2) end
  return c[1], c[2] == '1', err
end

if seq < 0 then
  -- release: report every missing seq before the held chunks, deliver them
  local deadline = tonumber(state[3] or '0')
  if deadline == 0 or now_ms() < deadline then return {latest(), 'none'} end
  local seqs = {}
  for _, k in ipairs(redis.call('HKEYS', KEYS[6])) do seqs[#seqs + 1] = tonumber(k) end
  table.sort(seqs)
  if #seqs == 0 then
    settle()
    return {latest(), 'none'}
  end
  local parts, gaps, cur, last, done, err = {}, {}, nxt, nxt - 1, false, nil
  for _, s in ipairs(seqs) do
    if s >= cur and not done then
      if s > cur then gaps[#gaps + 1] = fmt(cur) .. '-' .. fmt(s - 1) end
      local content, d, e = held(s)
      parts[#parts + 1] = content
      last, cur, done, err = s, s + 1, d, e
    end
  end
  redis.call('DEL', KEYS[6])
  settle()
  return {deliver(nxt, last, table.concat(parts), done, err, table.concat(gaps, ',')), 'released'}
end

if seq < nxt or redis.call('HEXISTS', KEYS[6], fmt(seq)) == 1 then
  return {latest(), 'ignored'}
end
if seq > nxt then
  redis.call('HSET', KEYS[6], fmt(seq), cjson.encode({ARGV[4], ARGV[5], ARGV[6]}))
  if not state[3] then
    local due = now_ms() + tonumber(ARGV[12])
    redis.call('HSET', KEYS[3], 'deadline', due)
    redis.call('ZADD', KEYS[7], due, member)
  end
  redis.call('EXPIRE', KEYS[6], ttl)
  redis.call('EXPIRE', KEYS[3], ttl)
  return {latest(), 'held'}
end
-- the next chunk: deliver it with the held ones that follow it
local parts, last, done, err = {ARGV[4]}, seq, ARGV[5] == '1', nil
if ARGV[6] ~= '' then err = string.sub(ARGV[6], 2) end
while not done do
  local content, d, e = held(last + 1)
  if content == nil then break end
  redis.call('HDEL', KEYS[6], fmt(last + 1))
  parts[#parts + 1] = content
  last, done, err = last + 1, d, e
end
local cursor = deliver(seq, last, table.concat(parts), done, err, '')
if not done and redis.call('HLEN', KEYS[6]) == 0 then settle() end
return {cursor, 'delivered'}
"""
)

#: KEYS: held zset.  ARGV: most members to return.
#: The messages whose held chunks are due ("<room>\\n<message id>"), by Redis' clock.
HELD_DUE = LuaScript(
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
"""
)

#: loaded at connection time with the others (L{unrealon.engine.redis.ALL_SCRIPTS}):
#: a script loaded on first use would overtake calls made after it
SCRIPTS = (CHUNK, HELD_DUE)
